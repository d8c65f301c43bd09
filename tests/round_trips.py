"""A TCP proxy on loopback in front of PostgreSQL that counts round trips: the times the
server answered after the client had sent something. PostgreSQL sends its answers when
the client asks for them (a Sync, a Flush, a simple query), so a turn in the traffic's
direction from client-to-server to server-to-client is one wait of the client's."""

from __future__ import annotations

import socket
import threading


class RoundTripProxy:
    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._last: dict[int, str] = {}  # per client connection: the direction seen last
        self.answers = 0
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.answers = 0

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._target)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, server]
            for source, target, direction in ((client, server, "up"), (server, client, "down")):
                threading.Thread(target=self._pump, args=(source, target, direction, id(client)),
                                 daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, direction: str, connection: int) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:  # counted before it is passed on: the answer cannot come first
                    if direction == "down" and self._last.get(connection) == "up":
                        self.answers += 1
                    self._last[connection] = direction
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
