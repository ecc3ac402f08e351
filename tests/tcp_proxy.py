"""A TCP forwarder the tests kill, throttle and stall, to make storage absent or slow for real.

    python tests/tcp_proxy.py LISTEN_PORT TARGET_PORT [BYTES_PER_SECOND] [--report]
                              [--delay SECONDS]

--delay holds what a client sends for SECONDS before it goes on to the server (each request
waits that long, as for a distant store; requests in flight at once overlap). BYTES_PER_SECOND
throttles each connection in each direction (0: as fast as it goes). What a
client sends is read at once and forwarded to the server at that rate, so an upload can be
wholly in flight: sent by the client, not yet at the server. SIGUSR1 stalls everything bound
for the server (a link that stops moving) and prints `held`; SIGUSR2 lets it go on (`flowing`).

With --report, each connection and HTTP/1.1 exchange is printed as it passes, for a test to
wait on or count:
    connection <conn>                 a client connected
    request <conn> <request line>     its head came from the client
    received <conn> <request line>    its whole body too (by its Content-Length)
    answered <conn> <status line>     the server's answer began
"""

import asyncio
import signal
import sys

REPORT = "--report" in sys.argv
DELAY = float(sys.argv[sys.argv.index("--delay") + 1]) if "--delay" in sys.argv else 0.0


def report(*words: object) -> None:
    if REPORT:
        print(*words, flush=True)


class Requests:
    """Finds the requests in what one client sends: heads and, by Content-Length, bodies."""

    def __init__(self, conn: int):
        self.conn = conn
        self.head = bytearray()
        self.body_left = 0
        self.line = ""

    def feed(self, data: bytes) -> None:
        while data:
            if self.body_left:
                taken = min(self.body_left, len(data))
                self.body_left -= taken
                data = data[taken:]
                if not self.body_left:
                    report("received", self.conn, self.line)
                continue
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.head[:end]).decode("latin-1").split("\r\n")
            data = bytes(self.head[end + 4:])
            self.head.clear()
            self.line = lines[0]
            lengths = [h.split(":", 1)[1] for h in lines[1:]
                       if h.lower().startswith("content-length:")]
            self.body_left = int(lengths[0]) if lengths else 0
            report("request", self.conn, self.line)
            if not self.body_left:
                report("received", self.conn, self.line)


async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float,
                   flowing: asyncio.Event, conn: int) -> None:
    """Client -> server: read as fast as the client sends, forward at `rate` unless held."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    requests = Requests(conn)
    loop = asyncio.get_running_loop()

    async def read() -> None:
        while data := await reader.read(1 << 16):
            requests.feed(data)
            queue.put_nowait((loop.time() + DELAY, data))
        queue.put_nowait((0.0, b""))

    reading = asyncio.ensure_future(read())
    step = max(1024, int(rate / 20)) if rate else 1 << 16
    try:
        while True:
            due, data = await queue.get()
            if not data:
                break
            if DELAY:
                await asyncio.sleep(max(0.0, due - loop.time()))
            for i in range(0, len(data), step):
                await flowing.wait()
                writer.write(data[i:i + step])
                await writer.drain()
                if rate:
                    await asyncio.sleep(len(data[i:i + step]) / rate)
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        reading.cancel()
        writer.close()


async def downstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float,
                     conn: int) -> None:
    """Server -> client at `rate`."""
    try:
        while data := await reader.read(1 << 16):
            if data.startswith(b"HTTP/1."):
                report("answered", conn, data.split(b"\r\n", 1)[0].decode("latin-1"))
            writer.write(data)
            await writer.drain()
            if rate:
                await asyncio.sleep(len(data) / rate)
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main(listen: int, target: int, rate: float) -> None:
    flowing = asyncio.Event()
    flowing.set()
    loop = asyncio.get_running_loop()

    def hold() -> None:
        flowing.clear()
        print("held", flush=True)

    def go_on() -> None:
        flowing.set()
        print("flowing", flush=True)

    loop.add_signal_handler(signal.SIGUSR1, hold)
    loop.add_signal_handler(signal.SIGUSR2, go_on)
    connections = 0

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        conn = connections
        report("connection", conn)
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
        except OSError:  # nothing listens there: the client's connection is cut, as by a host
            client_w.close()
            return
        await asyncio.gather(upstream(client_r, server_w, rate, flowing, conn),
                             downstream(server_r, client_w, rate, conn))

    server = await asyncio.start_server(handle, "127.0.0.1", listen, reuse_address=True)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    numbers = [arg for i, arg in enumerate(sys.argv[1:], 1)
               if not arg.startswith("--") and sys.argv[i - 1] != "--delay"]
    asyncio.run(main(int(numbers[0]), int(numbers[1]), float(numbers[2]) if numbers[2:] else 0))
