"""Run by tests/test_ddp.py in its own process: a short DDP (gloo, CPU) fit that writes, per rank,
the sampled stitch sequence and a checksum of the final weights."""
import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import RecordStitches, tiny_data, tiny_module  # noqa: E402

if __name__ == "__main__":
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    module = tiny_module()
    record = RecordStitches()
    strategy = "ddp_find_unused_parameters_true" if devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_epochs=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, callbacks=[record],
    )
    trainer.fit(module, tiny_data(module))
    weights = torch.cat([p.detach().flatten() for p in module.parameters()])
    (out / f"rank{trainer.global_rank}_of_{devices}.json").write_text(
        json.dumps({"stitches": record.stitches, "weights_sum": float(weights.double().sum()), "weights": weights[:1000].tolist()})
    )
