"""Aff-Wild2 data: synthetic generator, preprocessing, TFDS and tf.data."""
