"""The PyTorch peer's training step for the CPU benchmarks (imports torch and diffusers
only, so a torch-only worker process can use it)."""

import torch


def torch_step(cfg, batch):
    """(step() -> loss, model): diffusers U-Net forward with text context and precision
    level, MSE against a fixed target, backward, AdamW (lr 1e-4, wd 1e-2)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**cfg["unet"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)
    x = torch.from_numpy(batch["x"]).permute(0, 3, 1, 2).contiguous()
    target = torch.from_numpy(batch["target"]).permute(0, 3, 1, 2).contiguous()
    t, ctx, s = (torch.from_numpy(batch[k]) for k in ("t", "ctx", "s"))

    def run():
        opt.zero_grad(set_to_none=True)
        out = model(x, t.long(), ctx, class_labels=s.long()).sample
        loss = torch.nn.functional.mse_loss(out, target)
        loss.backward()
        opt.step()
        return loss.item()

    return run, model
