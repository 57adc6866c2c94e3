"""A real TLS handshake between two SSLObjects over memory BIOs (no sockets)."""

from __future__ import annotations

import contextlib
import ssl


def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext
              ) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for name, obj in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server verifies the client's certificate on its last flight; make
            # the client process whatever the server sent back (an alert on rejection).
            with contextlib.suppress(ssl.SSLWantReadError):
                client.read(1)
            return client, server
    raise AssertionError("handshake did not finish")
