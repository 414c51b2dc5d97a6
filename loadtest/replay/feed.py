"""The direct path: a source's frames straight into an appliance's Redis buffer, validated and
packed the way the ingester packs them (micro-batched entries, dead letters and the cursor in
one MULTI/EXEC); and when that buffer is drained (every entry acknowledged by the batcher)."""

from __future__ import annotations

import threading
import time

import redis

from appliance import buffer
from appliance import events as ev
from appliance.config import Settings
from loadtest.replay import source


def drained(client: redis.Redis, s: Settings) -> bool:
    """Every entry delivered to the batcher and acknowledged (so its rows are in Parquet)."""
    try:
        groups = client.xinfo_groups(s.stream_key)
    except redis.ResponseError:
        return False
    group = next((g for g in groups if g["name"].decode() == s.consumer_group), None)
    if group is None or group["pending"]:
        return False
    last = group["last-delivered-id"].decode()
    return not client.xrange(s.stream_key, min=buffer.next_id(last), count=1)


class Feeder:
    """Feeds the frames of `paths` in a thread. With `write_cursor` off (a running appliance's
    buffer) the ingester's resume cursor is left alone: it belongs to that ingester's source."""

    def __init__(self, settings: Settings, paths: list[str], write_cursor: bool = True) -> None:
        self.settings, self.paths, self.write_cursor = settings, paths, write_cursor
        self.done = False
        self.fed = 0  # frames written (valid and dead-lettered)
        self.stop = threading.Event()
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait(self, timeout_s: float) -> bool:
        """Until every frame is written (True) or the timeout."""
        return self._finished.wait(timeout_s)

    def _run(self) -> None:
        try:
            self._feed()
        finally:
            self._finished.set()

    def _feed(self) -> None:
        s = self.settings
        client = redis.Redis(host=s.redis_host, port=s.redis_port, password=s.redis_password)
        frames: list[bytes] = []
        dead: list[tuple[str, bytes]] = []
        cursor = 0
        try:
            for frame in source.frames_of(self.paths):
                if self.stop.is_set():
                    return
                try:
                    cursor = max(cursor, ev.decode(frame, max_bytes=s.max_event_bytes).time_us)
                    frames.append(frame)
                except ev.Rejected as exc:
                    dead.append((exc.reason, frame))
                if len(frames) >= s.ingest_pipeline_events:
                    self._write(client, frames, dead, cursor)
            self._write(client, frames, dead, cursor)
            self.done = True
        finally:
            client.close()

    def _write(
        self, client: redis.Redis, frames: list[bytes], dead: list[tuple[str, bytes]], cursor: int
    ) -> None:
        s = self.settings
        per = s.ingest_entry_events
        while not self.stop.is_set():
            pipe = client.pipeline(transaction=True)
            for reason, frame in dead:
                buffer.queue_dead_letter(pipe, s, reason, frame, "direct")  # type: ignore[arg-type]
            for i in range(0, len(frames), per):
                pipe.xadd(s.stream_key, buffer.pack(frames[i : i + per]))  # type: ignore[arg-type]
            if frames and self.write_cursor:
                pipe.set(s.cursor_key, str(cursor))
            try:
                pipe.execute()
                break
            except redis.RedisError:  # full (noeviction) or restarting: wait, as the ingester does
                time.sleep(0.5)
        self.fed += len(frames) + len(dead)
        frames.clear()
        dead.clear()
