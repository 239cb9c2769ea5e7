"""What Python's ssl module cannot make a TLS peer do, done through OpenSSL itself: a TLS 1.3
KeyUpdate that asks the other side to answer with its own (the one TLS message a hub must
send while it reads).  Used by tests/test_dataloop.py and tests/test_hub_dataloop.py."""

from __future__ import annotations

import _ssl
import ctypes
import ssl

from tunnel.tls import TLSStream

TLS1_3_VERSION = 0x0304
SSL_KEY_UPDATE_REQUESTED = 1
# CPython's PySSLSocket (Modules/_ssl.c, 3.8 and later): PyObject_HEAD, the socket's
# weakref, then the SSL pointer.
_SSL_POINTER_OFFSET = 2 * ctypes.sizeof(ctypes.c_void_p) + ctypes.sizeof(ctypes.c_ssize_t)

_libssl = ctypes.CDLL(_ssl.__file__)  # the libssl that _ssl is linked to, already loaded
_libssl.SSL_version.argtypes = [ctypes.c_void_p]
_libssl.SSL_is_server.argtypes = [ctypes.c_void_p]
_libssl.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]


def _ssl_pointer(tls: ssl.SSLObject) -> int:
    """OpenSSL's SSL* behind `tls`, checked against what `tls` says of itself."""
    sslobj = tls._sslobj  # type: ignore[attr-defined]
    pointer = ctypes.c_void_p.from_address(id(sslobj) + _SSL_POINTER_OFFSET).value
    if (pointer is None or _libssl.SSL_version(pointer) != TLS1_3_VERSION
            or bool(_libssl.SSL_is_server(pointer)) != tls.server_side):
        raise RuntimeError("this CPython's SSL object layout is not the one expected")
    return pointer


def request_key_update(stream: TLSStream) -> None:
    """Make `stream`'s next write start with a KeyUpdate that requests the peer's."""
    if _libssl.SSL_key_update(_ssl_pointer(stream._ssl), SSL_KEY_UPDATE_REQUESTED) != 1:
        raise RuntimeError("OpenSSL refused SSL_key_update")
