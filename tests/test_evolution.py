"""--strategy evolution / random on a lookup-table "supernet" (loss a known function of the
configuration): legal individuals only, seeded, resumable from the state file, and better than the
initial population."""
import json

import pytest

from search.evolution import EvolutionSettings, evolution_search, random_search

BITS = (2, 3, 4, 5, 6)
MACS = {"first": 50, "l1": 10, "l2": 20, "l3": 30, "l4": 40, "l5": 15, "last": 5}
CHOICES = {n: ((8,), (8,)) if n in ("first", "last") else (BITS, BITS) for n in MACS}
BASE = {n: (8, 8) if n in ("first", "last") else (6, 6) for n in MACS}
SENS = {"l1": 0.05, "l2": 0.02, "l3": 0.004, "l4": 0.001, "l5": 0.03}


def bitops(c):
    return sum(MACS[n] * w * a for n, (w, a) in c.items())


class Table:
    def __init__(self, fail_after=None):
        self.calls, self.fail_after = [], fail_after

    def __call__(self, c):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls.append(dict(c))
        return {"loss": loss_of(c), "acc": max(0.0, 1.0 - loss_of(c))}


def loss_of(c):
    return 0.3 + sum(s * (6 - c[n][0]) ** 2 + 0.5 * s * (6 - c[n][1]) ** 2 for n, s in SENS.items())


BUDGET = bitops({**BASE, **{n: (4, 4) for n in SENS}})
SMALL = EvolutionSettings(population=12, generations=5, parents=4, mutations=6, crossovers=6, seed=1)


def test_every_individual_is_legal_and_the_search_improves():
    table = Table()
    res = evolution_search(CHOICES, BASE, table, bitops, BUDGET, SMALL)
    assert table.calls and all(0.9 * BUDGET <= bitops(c) <= BUDGET for c in table.calls)
    assert all(c["first"] == (8, 8) and c["last"] == (8, 8) for c in table.calls)
    metrics = [s.metric for s in res.path]
    assert len(res.path) == SMALL.generations + 1
    assert all(b <= a for a, b in zip(metrics, metrics[1:]))            # the best never gets worse
    assert metrics[-1] < metrics[0]
    assert res.final.config == min(table.calls, key=loss_of)
    assert len({json.dumps(sorted(c.items())) for c in table.calls}) == len(table.calls)   # each once


def test_seeded():
    a = evolution_search(CHOICES, BASE, Table(), bitops, BUDGET, SMALL)
    b = evolution_search(CHOICES, BASE, Table(), bitops, BUDGET, SMALL)
    c = evolution_search(CHOICES, BASE, Table(), bitops, BUDGET, EvolutionSettings(**{**SMALL.__dict__, "seed": 2}))
    assert [s.config for s in a.path] == [s.config for s in b.path]
    assert [s.config for s in a.path] != [s.config for s in c.path]


def test_resumes_from_its_state_file_after_a_crash(tmp_path):
    state = str(tmp_path / "evolution_state.json")
    ref = evolution_search(CHOICES, BASE, Table(), bitops, BUDGET, SMALL)
    n = 40   # evaluations before the crash: past the first generations, before the last
    with pytest.raises(KeyboardInterrupt):
        evolution_search(CHOICES, BASE, Table(fail_after=n), bitops, BUDGET, SMALL, state_path=state)
    saved = json.loads(open(state).read())
    assert 1 <= saved["generation"] < SMALL.generations
    again = Table()
    res = evolution_search(CHOICES, BASE, again, bitops, BUDGET, SMALL, state_path=state)
    assert res.stats["resumed_from"] == saved["generation"]
    assert [s.config for s in res.path] == [s.config for s in ref.path]
    assert len(again.calls) < ref.exact_calls                         # the saved evaluations are reused


def test_random_search_baseline():
    table = Table()
    res = random_search(CHOICES, BASE, table, bitops, BUDGET, samples=30, seed=0)
    assert len(table.calls) == 30 and all(0.9 * BUDGET <= bitops(c) <= BUDGET for c in table.calls)
    assert res.final.config == min(table.calls, key=loss_of)
    with pytest.raises(ValueError, match="samples"):
        random_search(CHOICES, BASE, table, bitops, BUDGET, samples=0)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="parents"):
        evolution_search(CHOICES, BASE, Table(), bitops, BUDGET, EvolutionSettings(population=4, parents=5))
    with pytest.raises(ValueError, match="no legal"):
        evolution_search(CHOICES, BASE, Table(), bitops, 1.0, SMALL)
