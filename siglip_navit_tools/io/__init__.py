# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""Bytes in and out, for both tools. Knows nothing about models, checkpoints' key layouts or images.

    locations    Location (a local path or fsspec URL, through fsspec either way) and ByteReader (exact ranges)
    safetensors  the ONE header parser and its integrity checks, the hashed streaming writer, read-back verify
    atomic       atomic, durable replacement of files and directories (temporary sibling, fsync, rename)
    files        the ONE way to read a local file (regular files only, never a blocking open) and listings that end
    lock         the ONE output lock (flock: never held by forked workers, freed when its process dies)
"""
