"""A TCP proxy on loopback that the client tests cut, stall or refuse at will, to fail the network
under the SDK's retries and resends."""

from __future__ import annotations

import socket
import threading
import time


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 whose connections the test can cut at will.

    ``cut()`` closes every open connection at once (both sides), like a network failure.
    ``swallow_replies_then_cut()`` forwards requests but drops the next bytes the server sends and
    then cuts: the server applied the request, the client never hears back.
    ``refuse(n)`` accepts and immediately closes the next ``n`` connections.
    ``hold()`` parks new connections (accepted, not forwarded) until ``release()``.
    """

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.target = f"127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._swallow = threading.Event()
        self._refuse = 0
        self._held: list[socket.socket] | None = None
        self.cuts = 0
        self.connections = 0
        self._stopped = False
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept_thread.start()

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                if self._refuse > 0:
                    self._refuse -= 1
                    downstream.close()
                    continue
                if self._held is not None:
                    self._held.append(downstream)
                    continue
            self._forward(downstream)

    def _forward(self, downstream: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            downstream.close()
            return
        with self._lock:
            self._pairs.append((downstream, upstream))
        threading.Thread(target=self._pump, args=(downstream, upstream, False), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, downstream, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_server and self._swallow.is_set():
                    self._swallow.clear()
                    time.sleep(0.05)  # let the server finish what it was doing with this request
                    self.cut()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
            self.cuts += 1
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def swallow_replies_then_cut(self) -> None:
        self._swallow.set()

    def hold(self) -> None:
        with self._lock:
            self._held = []

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held or [], None
        for downstream in held:
            self._forward(downstream)

    def refuse(self, n: int) -> None:
        with self._lock:
            self._refuse = n

    def close(self) -> None:
        self._stopped = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        except OSError:
            pass
        self._listener.close()
        self._accept_thread.join(timeout=5)
        with self._lock:
            held, self._held = self._held or [], None
        for downstream in held:
            downstream.close()
        self.cut()
