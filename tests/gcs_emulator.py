"""A local GCS API for tests: gcp-storage-emulator plus what the stack needs.

Run as a script (`python tests/gcs_emulator.py PORT_FILE CERT KEY BUCKET`) it
serves, in that child process and on 127.0.0.1 only:

* the emulator's JSON API on one port (TensorStore, i.e. orbax's array
  writer, talks to it over plain HTTP through `TENSORSTORE_GCS_HTTP_URL`);
* an HTTPS proxy on another port. TensorFlow's GCS file system (used by
  `tf.io.gfile`, `tf.summary`, TFDS and by `etils.epath` when TensorFlow is
  installed) always connects to the public host and cannot be given another
  endpoint, but its curl honours `https_proxy` and `CURL_CA_BUNDLE`: the
  proxy answers `CONNECT` itself, terminates TLS with a self-signed
  certificate for that host and forwards the decrypted bytes to the emulator.

The emulator is single-threaded and lacks a few GCS behaviours the stack
relies on; `_install_shims` adds them (see each shim's comment). It never runs
inside the test process: a slow request would otherwise stall the test.

`start(tmpdir)` (used by the pytest fixture) starts the child, waits for its
ports and returns the environment variables that point every client at it.
"""

from __future__ import annotations

import dataclasses
import http
import os
import select
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time

# TensorFlow reaches the JSON API at both hosts (uploads/downloads vs metadata).
PUBLIC_HOSTS = ("storage.googleapis.com", "www.googleapis.com")


# --- child process -----------------------------------------------------------


def _install_shims() -> None:
  """Patches gcp-storage-emulator where it differs from GCS as the stack uses it.

  * Every object response carries `x-goog-generation` (TensorStore reads the
    generation of a write from it; without it its saves fail with
    "Malformed StorageGeneration").
  * `ifGenerationMatch` is enforced (TensorStore's conditional writes, and
    `ifGenerationMatch=0` "create only if absent").
  * `GET /b/<bucket>/storageLayout` answers a flat bucket (TensorFlow asks
    before renaming a directory, i.e. before TFDS finishes a dataset).
  * URLs the emulator hands out (resumable upload sessions) say `https://`
    for requests that came through the TLS proxy, so curl sends the
    follow-up through the proxy as well.
  * A chunk-encoded body is decoded even when the request also carries a
    Content-Length (TensorFlow's uploads do; the emulator would store the
    chunk framing and cut the object at that length).
  * `Expect: 100-continue` is answered at once (curl, under TensorFlow,
    otherwise waits a second before every upload body), and every connection
    still serves one request: the server is single-threaded, an idle
    keep-alive connection would block everyone else.
  * An upload with an empty body creates an empty object (the emulator reads
    the missing body as None and drops the connection; TensorFlow creates
    directory markers that way).
  """
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects

  read_raw = server._read_raw_data

  def read_chunked_first(request_handler):
    headers = request_handler.headers
    if (headers.get("Transfer-Encoding") or "").lower() == "chunked":
      del headers["Content-Length"]
    return read_raw(request_handler)

  server._read_raw_data = read_chunked_first
  read_data = server._read_data

  def read_data_or_empty(request_handler, query):
    data = read_data(request_handler, query)
    return b"" if data is None and "uploadType" in query else data

  server._read_data = read_data_or_empty

  request_init = server.Request.__init__

  def https_for_public_hosts(self, request_handler, method):
    request_init(self, request_handler, method)
    if request_handler.headers.get("Host") in PUBLIC_HOSTS:
      for attr in ("_base_url", "_full_url"):
        url = getattr(self, attr)
        setattr(self, attr, "https://" + url.removeprefix("http://"))

  server.Request.__init__ = https_for_public_hosts

  class OneRequestPerConnection(server.RequestHandler):
    protocol_version = "HTTP/1.1"  # so `Expect: 100-continue` is answered

    def parse_request(self):
      ok = super().parse_request()
      self.close_connection = True
      return ok

    def end_headers(self):
      self.send_header("Connection", "close")
      super().end_headers()

  server.RequestHandler = OneRequestPerConnection

  def with_generation(handler):
    def wrapped(request, response, storage, *args, **kwargs):
      condition = request.query.get("ifGenerationMatch")
      if condition is not None:
        bucket = request.params.get("bucket_name")
        name = request.params.get("object_id") or _upload_name(request)
        current = _generation(storage, bucket, name)
        if str(current or 0) != condition[0]:
          response.status = http.HTTPStatus.PRECONDITION_FAILED
          response.json(
            {"error": {"code": 412, "message": "Precondition Failed"}}
          )
          return None
      result = handler(request, response, storage, *args, **kwargs)
      bucket = request.params.get("bucket_name")
      name = request.params.get("object_id") or _upload_name(request)
      generation = _generation(storage, bucket, name) if name else None
      if generation is not None:
        response["x-goog-generation"] = str(generation)
      return result

    return wrapped

  def storage_layout(request, response, storage, *args, **kwargs):
    del storage, args, kwargs
    bucket = request.params["bucket_name"]
    response.json(
      {
        "kind": "storage#storageLayout",
        "bucket": bucket,
        "location": "US",
        "locationType": "multi-region",
        "hierarchicalNamespace": {"enabled": False},
      }
    )

  for name in ("insert", "get", "download", "upload_partial", "xml_upload"):
    setattr(objects, name, with_generation(getattr(objects, name)))
  handlers = []
  for regex, methods in server.HANDLERS:
    methods = {
      m: getattr(objects, h.__name__, h)
      if getattr(h, "__module__", "") == objects.__name__
      else h
      for m, h in methods.items()
    }
    handlers.append((regex, methods))
  layout = (
    r"^(/storage/v1)?/b/(?P<bucket_name>[-.\w]+)/storageLayout$",
    {"GET": storage_layout},
  )
  server.HANDLERS = (layout, *handlers)


def _upload_name(request) -> str | None:
  names = request.query.get("name")
  return names[0] if names else None


def _generation(storage, bucket, name) -> int | None:
  if not bucket or not name:
    return None
  try:
    meta = storage.get_file_obj(bucket, name)
  except Exception:  # noqa: BLE001  (absent object: no generation)
    return None
  return int(meta.get("generation", 0)) or None


class _Proxy(socketserver.ThreadingTCPServer):
  daemon_threads = True
  allow_reuse_address = True


def _proxy_handler(context: ssl.SSLContext, upstream: int):
  class Handler(socketserver.BaseRequestHandler):
    """`CONNECT host:443` -> TLS with our certificate -> bytes to the emulator."""

    def handle(self):
      head = b""
      while b"\r\n\r\n" not in head:
        chunk = self.request.recv(4096)
        if not chunk:
          return
        head += chunk
      if not head.startswith(b"CONNECT "):
        self.request.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
        return
      self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
      try:
        tls = context.wrap_socket(self.request, server_side=True)
      except (ssl.SSLError, OSError):
        return
      _pump(tls, upstream)

  return Handler


def _pump(tls: ssl.SSLSocket, upstream_port: int) -> None:
  """Copies bytes both ways until either side closes.

  The emulator speaks HTTP/1.0 and closes after each response; curl then
  opens a new tunnel for its next request.
  """
  with socket.create_connection(("127.0.0.1", upstream_port)) as up:
    socks = [tls, up]
    while True:
      pending = tls.pending() > 0
      ready = [tls] if pending else select.select(socks, [], [], 60)[0]
      if not ready:
        return
      for s in ready:
        try:
          data = s.recv(65536)
        except (ssl.SSLError, OSError):
          return
        if not data:
          return
        (up if s is tls else tls).sendall(data)


def _child_main(port_file: str, cert: str, key: str, bucket: str) -> None:
  import logging

  from gcp_storage_emulator import server

  # The emulator logs every missing object (normal probes) as an error.
  logging.basicConfig(level=logging.CRITICAL)
  _install_shims()
  emulator = server.create_server(
    "127.0.0.1", 0, in_memory=True, default_bucket=bucket
  )
  emulator.start()
  api_port = emulator._api._httpd.server_address[1]
  context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
  context.load_cert_chain(cert, key)
  context.set_alpn_protocols(["http/1.1"])
  proxy = _Proxy(("127.0.0.1", 0), _proxy_handler(context, api_port))
  threading.Thread(target=proxy.serve_forever, daemon=True).start()
  tmp = port_file + ".tmp"
  with open(tmp, "w") as f:
    f.write(f"{api_port} {proxy.server_address[1]}\n")
  os.replace(tmp, port_file)
  # The parent holds our stdin open; EOF means it is gone (even after
  # `kill -9`), so the emulator never outlives the tests.
  sys.stdin.buffer.read()
  # The emulator's server thread is not a daemon: leave without joining it.
  os._exit(0)


# --- test process ------------------------------------------------------------


@dataclasses.dataclass
class Emulator:
  """A running emulator child and the environment that reaches it."""

  process: subprocess.Popen
  bucket: str
  api_url: str
  env: dict[str, str]

  def stop(self) -> None:
    self.process.stdin.close()
    try:
      self.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()


def _certificate(directory: str) -> tuple[str, str]:
  cert = os.path.join(directory, "cert.pem")
  key = os.path.join(directory, "key.pem")
  subprocess.run(
    [
      "openssl",
      "req",
      "-x509",
      "-newkey",
      "rsa:2048",
      "-nodes",
      "-days",
      "1",
      "-subj",
      f"/CN={PUBLIC_HOSTS[0]}",
      "-addext",
      "subjectAltName=" + ",".join(f"DNS:{h}" for h in PUBLIC_HOSTS),
      "-keyout",
      key,
      "-out",
      cert,
    ],
    check=True,
    capture_output=True,
  )
  return cert, key


def start(directory: str, bucket: str = "affjax-test") -> Emulator:
  """Starts the emulator child; returns it with the client environment.

  Args:
    directory: a private temporary directory (certificate, port file).
    bucket: created empty at start.

  Raises:
    RuntimeError: the child died or did not report its ports within 30 s.
  """
  cert, key = _certificate(directory)
  port_file = os.path.join(directory, "ports")
  process = subprocess.Popen(
    [sys.executable, __file__, port_file, cert, key, bucket],
    stdin=subprocess.PIPE,
    stdout=subprocess.DEVNULL,
  )
  deadline = time.monotonic() + 30
  while not os.path.exists(port_file):
    if process.poll() is not None or time.monotonic() > deadline:
      process.kill()
      raise RuntimeError(
        f"GCS emulator did not start (exit code {process.poll()})"
      )
    time.sleep(0.05)
  with open(port_file) as f:
    api_port, proxy_port = f.read().split()
  api_url = f"http://127.0.0.1:{api_port}"
  env = {
    # google-cloud-storage and gcsfs.
    "STORAGE_EMULATOR_HOST": api_url,
    # TensorStore (orbax's array writer).
    "TENSORSTORE_GCS_HTTP_URL": api_url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
    # TensorFlow's GCS file system: through the proxy, trusting its
    # certificate, never probing a metadata server.
    "https_proxy": f"http://127.0.0.1:{proxy_port}",
    "HTTPS_PROXY": f"http://127.0.0.1:{proxy_port}",
    "CURL_CA_BUNDLE": cert,
    "NO_GCE_CHECK": "true",
    "no_proxy": "127.0.0.1,localhost",
    "NO_PROXY": "127.0.0.1,localhost",
  }
  return Emulator(process=process, bucket=bucket, api_url=api_url, env=env)


if __name__ == "__main__":
  _child_main(*sys.argv[1:5])
