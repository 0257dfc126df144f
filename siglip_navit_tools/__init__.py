# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""The tools around the SigLIP-NaViT Hub repo: checkpoint conversion, feature extraction, test fixtures.

Owns everything that is NOT remote code. Must never be copied into a converted repo, and the remote-code files
at the repo root must never import it (they import only torch, transformers, numpy, PIL and each other).

    errors     the user-facing error types (ToolError, ConversionError, UsageError): the bottom layer
    io         locations + range reads, the safetensors header parser, hashed streaming writer, atomic replace
    convert    checkpoint sources -> plan -> written + verified Hub repo
    extract    token-budget packed feature extraction into resumable shards
    repo_code  the one way to import the root's remote-code files as a package
    cli        the main() skeleton both commands share (errors -> exit codes, SIGTERM, logging)
    testing    the one tiny-checkpoint builder (tests, benchmarks, scripts, the demo and the notebook)
"""
