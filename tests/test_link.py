"""The client's scheduler link: a plain socket on the event loop's selector (zfabric/link.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import zmq

from zfabric.link import Link

pytestmark = pytest.mark.timeout(30)


def echo_peer(ctx: zmq.Context, address: str, stop: threading.Event, *, delay_s: float = 0.0):
    """A ROUTER that answers every message with the same frames, in order."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    ready = threading.Event()

    def run():
        ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(50):
                if delay_s:
                    stop.wait(delay_s)
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    sock.send_multipart(frames)
        sock.close(0)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ready.wait(5)
    return t


async def test_every_message_arrives_in_order_and_every_answer_is_read(tmp_path):
    # Given a link whose socket queues only a few messages, to a peer that starts late (an
    # ipc:// path of this test's own: no port another test could take meanwhile)
    ctx = zmq.Context()
    stop = threading.Event()
    thread = None
    address = f"ipc://{tmp_path}/peer"
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 2)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    got: list[int] = []
    done = asyncio.get_running_loop().create_future()

    def on_message(frames):
        got.append(int(frames[0]))
        if len(got) == 2000 and not done.done():
            done.set_result(None)

    link = Link(asyncio.get_running_loop(), sock, on_message)
    try:
        # When 2,000 messages are sent at once (most must wait in the link's backlog)
        for i in range(2000):
            link.send([str(i).encode()])
        # the socket refused most: nothing was dropped, they wait
        assert len(link.backlog) > 1000, len(link.backlog)
        thread = echo_peer(ctx, address, stop, delay_s=0.01)
        # Then every one is answered and read, in the order sent, without any other nudge
        try:
            await asyncio.wait_for(done, 20)
        except TimeoutError:
            raise AssertionError(f"{len(got)} answers read, {len(link.backlog)} unsent") from None
        assert got == list(range(2000))
        assert not link.backlog
    finally:
        link.close(0)
        stop.set()
        if thread is not None:
            thread.join(5)
        ctx.term()
    # and a closed link refuses to send
    with pytest.raises(zmq.ZMQError):
        link.send([b"late"])
