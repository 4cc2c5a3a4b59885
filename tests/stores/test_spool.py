"""The disk spool on its own: order, atomic files, one owner per directory."""
from __future__ import annotations

import uuid

import orjson

from gwcore.stores.spool import Batch, Spool, decode_batch, encode_batch
from tests.stores.helpers import make_record


def batch(seq: int, n: int = 3) -> Batch:
    return Batch(uuid.uuid4().hex, seq, [make_record(seq * 100 + i) for i in range(n)])


def test_batches_come_back_intact_and_in_sequence_order(tmp_path):
    spool = Spool(tmp_path)
    written = [batch(spool.next_seq()) for _ in range(3)]
    for b in reversed(written):  # the order of the numbers counts, not of the writes
        spool.write(b)
    assert spool.pending() == [1, 2, 3]
    assert [spool.read(s) for s in spool.pending()] == written
    spool.remove(2)
    assert spool.pending() == [1, 3]
    spool.close()
    # A later process continues the numbering after what is left, and drops torn writes.
    (tmp_path / "0000000000000009.batch.tmp").write_bytes(b"torn")
    again = Spool(tmp_path)
    assert again.pending() == [1, 3]
    assert again.next_seq() == 4
    assert not list(tmp_path.glob("*.tmp"))
    again.close()


def test_a_second_process_on_the_same_directory_gets_its_own(tmp_path):
    first, second, third = Spool(tmp_path), Spool(tmp_path), Spool(tmp_path)
    assert (first.dir, second.dir, third.dir) == (tmp_path, tmp_path / "w1", tmp_path / "w2")
    second.close()
    fourth = Spool(tmp_path)
    assert fourth.dir == tmp_path / "w1"  # free again once its owner is gone
    for spool in (first, third, fourth):
        spool.close()


def test_a_file_written_before_a_new_record_field_still_reads():
    b = batch(1, n=1)
    doc = orjson.loads(encode_batch(b))
    i = doc["fields"].index("reasoning_tokens")
    del doc["fields"][i]
    del doc["rows"][0][i]
    old = decode_batch(orjson.dumps(doc))
    assert old.records[0].reasoning_tokens == 0
    assert old.records[0].request_id == b.records[0].request_id
