"""Every read and write of a user's model file: the only place that calls ``torch.load`` / ``torch.save`` on them.

    sd = load_checkpoint(path)                    # dict of tensors, CPU, weights_only, memory-mapped
    cfg = detect_config(sd, path)                 # version and every size, from the keys and shapes
    model = load_model(path, dtype=None, device="cpu")
    save_atomic(model.state_dict(), path)         # temporary + fsync + rename: never half-written
    model = init_model(config_from_sizes(7, 2, 128), seed=0)

In four parts: ``models`` (base and merged model files), ``runs`` (a training run's files in OUTPUT: adapters with
their metadata, train_state.pth), ``imports`` (adapter and state files of other tools, read as ours), ``merging``
(./merge.sh). Everything is used as ``checkpoint.NAME``.
"""
from .imports import INIT_FILE, STATE_SUFFIX, read_adapter, state_key
from .merging import (MERGE_METHODS_WITH_MODEL, MERGED_FROM, MergeResult, attach_state_file, base_as_trained,
                      checkpoint_path, find_base_model, list_epochs, load_state_file, merge_checkpoint, merge_epoch,
                      merge_state_dicts, merge_usage_text, release_state_dict, state_file_dict)
from .models import (DTYPES, checkpoint_dtype, config_from_sizes, detect_config, expected_shapes, init_model,
                     load_checkpoint, load_model, model_from_state_dict, payload_bytes, save_atomic)
from .runs import (ADAPTER_FORMAT, DS_DIR, META_KEY, TRAIN_STATE, attach_adapter, base_metadata, check_adapter_meta,
                   check_base, clear_run, fingerprint, json_text, load_adapter, load_train_state, run_files,
                   save_adapter, save_train_state)

__all__ = [
    "MERGE_METHODS_WITH_MODEL", "MERGED_FROM", "STATE_SUFFIX", "MergeResult", "attach_state_file", "base_as_trained",
    "checkpoint_path", "find_base_model", "list_epochs", "load_state_file", "merge_checkpoint", "merge_epoch",
    "merge_state_dicts", "merge_usage_text", "read_adapter", "INIT_FILE", "release_state_dict", "state_file_dict",
    "state_key", "DTYPES", "checkpoint_dtype", "config_from_sizes", "detect_config", "expected_shapes", "init_model",
    "load_checkpoint", "load_model", "model_from_state_dict", "payload_bytes", "save_atomic", "ADAPTER_FORMAT",
    "DS_DIR", "META_KEY", "TRAIN_STATE", "attach_adapter", "base_metadata", "check_adapter_meta", "check_base",
    "clear_run", "fingerprint", "json_text", "load_adapter", "load_train_state", "run_files", "save_adapter",
    "save_train_state",
]
