"""Rewrite a teacher-target store in another log-probability format, without the teacher.

Store the teacher's targets once exactly (``float32``) and make the compact copy (``q8``) from
them: every source shard is read with its checks (CRC-32s, ids, counts), re-encoded and written
atomically, so a killed conversion continues where it stopped and a corrupt source is an error,
never a silently corrupt copy.
"""

from __future__ import annotations

import os
from dataclasses import replace

from salt_megatron.data.errors import DataError
from salt_megatron.data.teacher_targets import (
    FORMAT,
    SPEC_FILE,
    TargetSpec,
    TargetStore,
    read_spec,
    remove_stale_temporaries,
    shard_done,
    write_shard,
    write_spec,
)


def convert_store(src: str, dst: str, logprob_format: str, command: str) -> TargetSpec:
    """Write the targets of the store ``src`` (any format) to ``dst`` as a format-2 store in
    ``logprob_format``; ``command`` is recorded as the one that rewrites ``dst``. Shards already
    complete in ``dst`` (an earlier, killed conversion of the same source) are kept."""
    if os.path.realpath(src) == os.path.realpath(dst):
        raise DataError(f"--convert {src}: the output directory is the source; use another --out")
    source = TargetStore(src)
    spec = replace(source.spec, logprob_format=logprob_format, command=command, format=FORMAT)
    if os.path.isfile(os.path.join(dst, SPEC_FILE)):
        diff = read_spec(dst).differences(spec, ignore=("command",))
        if diff:
            raise DataError(f"--out {dst} holds another store ({'; '.join(diff)}); use another "
                            "--out")  # fmt: skip
    remove_stale_temporaries(dst)
    write_spec(dst, spec)
    for shard in range(spec.num_shards):
        if not shard_done(dst, spec, shard):
            write_shard(dst, spec, shard, *source.read_shard(shard))
    return spec
