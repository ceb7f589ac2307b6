"""The child process of columnar's SQLite reader: a SQLite store's selects as Arrow IPC streams.

    python -m proxy.analysis.sqlite_child PATH

Reads one request per line on stdin, {"sql": ..., "params": [...]}, runs it through SQLite's ADBC
driver (Arrow arrays filled by the driver, no Python object per value), and answers on stdout
with a frame: a status byte (0: an Arrow IPC stream follows, 1: an error message follows) and
the length of what follows (8 bytes, little-endian). The driver links its own copy of SQLite,
which is why it runs here and not in the report's process (proxy/analysis/columnar.py).

Imports nothing of the proxy: it starts in the time pyarrow and the driver take to load.
"""

from __future__ import annotations

import json
import struct
import sys
from typing import BinaryIO

import adbc_driver_sqlite.dbapi
import pyarrow as pa

FRAME = struct.Struct("<bq")
OK, FAILED = 0, 1


def serve(path: str, requests: BinaryIO, answers: BinaryIO) -> None:
    with adbc_driver_sqlite.dbapi.connect(path, autocommit=True) as connection:
        for line in requests:
            request = json.loads(line)
            try:
                with connection.cursor() as cursor:
                    cursor.execute(request["sql"], request["params"] or None)
                    table = cursor.fetch_arrow_table()
            except adbc_driver_sqlite.dbapi.Error as exc:
                message = f"{type(exc).__name__}: {exc}".encode()
                answers.write(FRAME.pack(FAILED, len(message)) + message)
                answers.flush()
                continue
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            stream = sink.getvalue()
            answers.write(FRAME.pack(OK, stream.size))
            answers.write(memoryview(stream))
            answers.flush()


if __name__ == "__main__":
    serve(sys.argv[1], sys.stdin.buffer, sys.stdout.buffer)
