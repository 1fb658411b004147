"""The gRPC data path: block bytes travel in WriteBlocks / ReadBlocks messages.

For a client the daemon does not trust with its arena (TCP, another host) or that could not
map it. Proofs: the daemon copies each row while the lease holds and stops the stream when the
lease ends, so every row that arrived is proven (kvstore/store/blockstore.py read_remote).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import numpy as np

from kvstore.client import transfer
from kvstore.client.datapath.base import DataPath, Read
from kvstore.client.errors import FailedPrecondition, KVStoreError, from_rpc_error
from kvstore.v1 import kvstore_pb2 as pb

if TYPE_CHECKING:
    from kvstore.client.lease import BlockLease
    from kvstore.client.sdk import KVClient


class StreamPath(DataPath):
    def __init__(self, client: "KVClient", max_message_bytes: int):
        """``max_message_bytes``: the largest message the daemon accepts (SessionEvent)."""
        self._client = client
        self._max_message_bytes = max_message_bytes

    def write(self, session_id: int, allocation_id: int, offsets: list[int], rows,
              ready=None) -> int:
        todo = [i for i, o in enumerate(offsets) if o >= 0]
        bb = rows.shape[1]
        per_msg = max(1, (self._max_message_bytes - (64 << 10)) // bb)
        run: list[int] = []
        for i in todo + [None]:
            if run and (i is None or i != run[-1] + 1 or len(run) == per_msg):
                data = b"".join(_row_bytes(rows[j]) for j in run)
                self._client.call("WriteBlocks", pb.WriteBlocksRequest(
                    session_id=session_id, allocation_id=allocation_id, first_index=run[0],
                    data=data))
                run = []
            if i is not None:
                run.append(i)
        return len(todo)

    def read(self, lease: "BlockLease", dst, ready=None) -> Read:
        """Rows arrive in order, so a gap, a repeat or a row of the wrong size is a protocol
        error (KVStoreError), never a silent hole; a stream that ends early (the lease ended)
        makes the rest a miss."""
        bb = dst.shape[1]
        got = 0
        try:
            stream = self._client.stream("ReadBlocks", pb.ReadBlocksRequest(
                session_id=lease.session_id, lease_id=lease.lease_id))
            for msg in stream:
                if msg.index != got or len(msg.data) != bb:
                    stream.cancel()
                    raise KVStoreError(
                        f"ReadBlocks sent row {msg.index} of {len(msg.data)} bytes, expected row "
                        f"{got} of {bb} bytes (of {len(lease)})")
                transfer.copy_rows(dst[got], np.frombuffer(msg.data, dtype=np.uint8))
                got += 1
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            if isinstance(err, FailedPrecondition) and got == 0:
                return Read(0, 0)    # the lease ended before the stream began: a miss
            raise err from None
        return Read(got, got)


def _row_bytes(row) -> bytes:
    if transfer._is_torch(row):
        return row.cpu().numpy().tobytes()
    return row.tobytes()
