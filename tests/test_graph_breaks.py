"""A quantized training step has no host-device sync and no graph break.

Every quantizer reads its ``initialized`` / ``signed`` flags as Python bools (mirrors of the
checkpointed buffers), so a steady-state forward never copies a tensor to the host: on a GPU that
would be a sync per quantizer per forward, under ``torch.compile`` a graph break (32 on ResNet-18
and 17 on the default model before the mirrors). The mirrors must survive a checkpoint round trip
and notice a buffer written from outside (a re-calibration's ``fill_``, a model EMA's ``copy_``).
"""
import pytest
import torch
import torch.nn.functional as F

import mpq
from mpq.quantizer import LsqQuantizer

CASES = {  # model, input shape (batch 2)
    "resnet18": (dict(name="resnet18", num_classes=10), (2, 3, 32, 32)),
    "small_mobilenet": (dict(name="small_mobilenet", num_classes=10, in_channels=1), (2, 1, 28, 28)),
}


def calibrated(case, w_bits=4, a_bits=4, seed=0):
    """A quantized model of ``case`` after activation calibration, at W``w_bits``A``a_bits``, in
    training mode; and an input batch and labels."""
    kwargs, shape = CASES[case]
    torch.manual_seed(seed)
    net = mpq.quantize_model(mpq.build_model(**kwargs))
    x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
    mpq.calibrate_activations(net, x)
    mpq.set_bits(net, mpq.uniform_config(net, w_bits, a_bits))
    net.train()
    return net, x, y


def quantizers(net):
    return {n: m for n, m in net.named_modules() if isinstance(m, LsqQuantizer)}


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_has_no_graph_break(case):
    net, x, y = calibrated(case)
    signs = {bool(q.signed) for q in quantizers(net).values()}
    assert signs == {True, False}  # both grids occur (unsigned after a ReLU), so both are traced

    def step(x, y):
        return F.cross_entropy(net(x), y)

    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(step)(x, y)
    finally:
        torch._dynamo.reset()
    reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


HOST_READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")


@pytest.mark.parametrize("case", ["small_mobilenet"])
def test_steady_state_step_reads_no_tensor_on_the_host(case, monkeypatch):
    """Eager forward + backward with every Python-level tensor-to-host read made an error (the CPU
    stand-in for ``torch.cuda.set_sync_debug_mode("error")``)."""
    net, x, y = calibrated(case)
    F.cross_entropy(net(x), y).backward()  # a first step, as in training

    def refuse(self, *args):
        raise AssertionError("a tensor was read on the host during a steady-state step")

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_step_does_not_sync():
    net, x, y = calibrated("small_mobilenet")
    net, x, y = net.cuda(), x.cuda(), y.cuda()
    F.cross_entropy(net(x), y).backward()  # first step: the moved buffers are re-read once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        F.cross_entropy(net(x), y).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_checkpoint_round_trip_restores_the_flags():
    net, x, y = calibrated("small_mobilenet")
    source = quantizers(net)
    unsigned = [n for n, q in source.items() if not q.is_signed()]
    assert unsigned  # the inputs after a ReLU
    fresh = mpq.quantize_model(mpq.build_model(**CASES["small_mobilenet"][0]))
    mpq.set_bits(fresh, mpq.uniform_config(fresh, 4, 4))
    fresh.train()
    loaded = quantizers(fresh)
    assert not any(loaded[n]._initialized for n in unsigned)  # fresh: uncalibrated, signed
    fresh.load_state_dict(net.state_dict())
    for n, q in loaded.items():
        # the Python mirrors themselves (a compiled forward reads them, no version check)
        assert (q._initialized, q._signed) == (True, source[n]._signed), n
    steps = {n: {b: s.detach().clone() for b, s in q.step_sizes().items()} for n, q in loaded.items()}
    out = fresh(x)
    for n, q in loaded.items():
        for b, s in q.step_sizes().items():
            assert torch.equal(s, steps[n][b]), (n, b)  # not re-initialised by the first forward
    assert torch.equal(out, net(x))


def test_an_outside_buffer_write_is_seen_by_the_next_forward():
    torch.manual_seed(0)
    q = LsqQuantizer((4,), signed=None, per_sample=True)
    x = torch.rand(3, 8) * 2.0  # non-negative: unsigned
    q(x, 4)
    assert not q.is_signed() and q.is_initialized()
    q.set_step(4, 0.25)
    # a model EMA copies the buffers with copy_: the mirror follows on the next forward
    q.signed.copy_(torch.tensor(True))
    out = q(x - 1.0, 4)
    assert torch.equal(out, mpq.fake_quant(x - 1.0, torch.tensor([0.25]), 8, 7))
    # mpq.calibrate_activations resets with fill_(False): the next forward initialises again
    q.initialized.fill_(False)
    q(x, 4)
    assert q.is_initialized() and float(q.step_for(4).detach()) != 0.25
    # the public setter writes buffer and mirror together
    q.set_signed(False)
    assert not bool(q.signed) and not q._signed
    # a buffer assigned anew (not written in place) is noticed too
    q.signed = torch.tensor(True)
    assert q.is_signed() and q.grid(4) == (8, 7)
    q.mark_uncalibrated()
    assert not bool(q.initialized) and not q._initialized
