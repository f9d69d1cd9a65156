"""train.compile: bit-widths read from tensors (mpq.supernet.use_tensor_bits), so a compiled
supernet traces its forward and backward once and does not recompile when the configuration
changes every subnet; the results equal the default path's."""
import copy
import random

import pytest
import torch
import torch.nn.functional as F

import mpq
from mpq.checkpoint import build_supernet
from mpq.supernet import drop_unused_step_grads, use_tensor_bits
from support import tiny_spec


def _net(name="small_cnn"):
    torch.manual_seed(0)
    net = build_supernet(tiny_spec(name))
    x = torch.randn(32, 1, 28, 28)
    y = torch.randint(0, 10, (32,))
    mpq.calibrate_activations(net, x)
    net.train()
    return net, x, y


def _random_configs(net, n, seed=0):
    rng = random.Random(seed)
    layers = mpq.quant_layers(net)
    return [{k: (rng.choice(m.w_candidates), rng.choice(m.a_candidates)) for k, m in layers.items()}
            for _ in range(n)]


@pytest.mark.parametrize("name", ["small_cnn", "small_mobilenet"])
def test_tensor_bits_give_the_default_paths_outputs_and_gradients(name):
    net, x, y = _net(name)
    ref = copy.deepcopy(net)
    use_tensor_bits(net)
    for cfg in _random_configs(net, 3):
        for m in (net, ref):
            mpq.set_bits(m, cfg)
            m.zero_grad(set_to_none=True)
        out, out_ref = net(x), ref(x)
        assert torch.equal(out, out_ref)   # the same codes and values: bit-identical forward
        F.cross_entropy(out, y).backward()
        F.cross_entropy(out_ref, y).backward()
        drop_unused_step_grads(net, [cfg])
        for (pn, p), q in zip(net.named_parameters(), ref.parameters()):
            assert (p.grad is None) == (q.grad is None), pn
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=pn)
        with torch.no_grad():   # evaluation (no autograd) too
            net.eval(), ref.eval()
            assert torch.equal(net(x), ref(x))
            net.train(), ref.train()


def _graphs_after(net, x, y, configs, backend) -> list:
    """Graphs dynamo has made after each config's forward + backward of the compiled net."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(net, backend=backend)
    seen = []
    for cfg in configs:
        mpq.set_bits(net, cfg)
        net.zero_grad(set_to_none=True)
        F.cross_entropy(compiled(x), y).backward()
        seen.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    return seen


def test_a_compiled_supernet_does_not_recompile_when_the_configuration_changes():
    net, x, y = _net("small_mobilenet")
    configs = _random_configs(net, 6, seed=1)
    # the default path: bits are Python attributes, dynamo guards on them and recompiles
    # (AOTAutograd traces forward and backward; no code generation, so this part is quick)
    default = _graphs_after(copy.deepcopy(net), x, y, configs, "aot_eager")
    assert default[-1] > default[0]
    use_tensor_bits(net)
    # inductor, as train.compile: its lowering must not read the bit index on the host either
    # (a 0-dim index tensor would: a graph break per quantizer)
    graphs = _graphs_after(net, x, y, configs, "inductor")
    assert graphs == [1] * len(configs), graphs


def test_drop_unused_step_grads_keeps_exactly_the_used_bit_widths():
    net, x, y = _net()
    use_tensor_bits(net)
    configs = _random_configs(net, 2, seed=2)
    for cfg in configs:
        mpq.set_bits(net, cfg)
        F.cross_entropy(net(x), y).backward()
    # before: every step size of every layer has a gradient (zeros for the unselected ones)
    assert all(p.grad is not None for m in mpq.quant_layers(net).values()
               for p in m.w_quant.step_sizes().values())
    drop_unused_step_grads(net, configs)
    for name, m in mpq.quant_layers(net).items():
        for quant, k in ((m.w_quant, 0), (m.a_quant, 1)):
            used = {c[name][k] for c in configs}
            for b, p in quant.step_sizes().items():
                assert (p.grad is not None) == (b in used), (name, k, b)


def test_train_compile_trains_with_tensor_bits(tmp_path):
    from support import tiny_config

    from mpq.trainer import Trainer
    tr = Trainer(tiny_config(tmp_path, "train.compile=true", "train.max_steps=2", "train.num_random=2"))
    assert all(m.bits_as_tensors for m in mpq.quant_layers(tr.net).values())
    tr.fit()
    import json
    with open(tmp_path / "tiny" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert rows and all(v == v for v in rows[-1]["train_loss"].values())
