"""Many adapters on one base: switching, disabling, deleting, combining, mixed batches."""

import copy
import warnings

import pytest
import torch

import lorakit
from lorakit import LoraLayer

from conftest import randomize


def two_adapters(model, targets):
    base_state = copy.deepcopy(model)
    lorakit.inject(model, targets, r=4, alpha=8, adapter="a")
    randomize(model)
    lorakit.inject(model, targets, r=2, alpha=2, adapter="b")
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLayer):
                for t in (m.adapters["b"].lora_a, m.adapters["b"].lora_b):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return base_state


def test_switch_disable_delete(tiny_llama):
    ids = torch.randint(0, 120, (2, 8))
    base = tiny_llama(ids).logits
    two_adapters(tiny_llama, ["q_proj", "v_proj"])
    assert lorakit.list_adapters(tiny_llama) == ["a", "b"]
    assert lorakit.active_adapter(tiny_llama) == "b"  # inject activates the adapter it adds
    out_b = tiny_llama(ids).logits
    lorakit.set_adapter(tiny_llama, "a")
    out_a = tiny_llama(ids).logits
    assert (out_a - out_b).abs().max() > 1e-3 and (out_a - base).abs().max() > 1e-3
    lorakit.disable_adapters(tiny_llama)
    assert torch.equal(tiny_llama(ids).logits, base)
    assert lorakit.active_adapter(tiny_llama) is None
    lorakit.enable_adapters(tiny_llama)
    assert torch.equal(tiny_llama(ids).logits, out_a)
    lorakit.delete_adapter(tiny_llama, "a")
    assert lorakit.list_adapters(tiny_llama) == ["b"] and lorakit.active_adapter(tiny_llama) is None
    assert torch.equal(tiny_llama(ids).logits, base)
    lorakit.set_adapter(tiny_llama, "b")
    assert torch.equal(tiny_llama(ids).logits, out_b)
    with pytest.raises(ValueError, match="no adapter 'a' on LlamaForCausalLM; adapters: b"):
        lorakit.set_adapter(tiny_llama, "a")


def test_switching_while_merged_is_refused(tiny_llama):
    two_adapters(tiny_llama, ["q_proj"])
    lorakit.merge(tiny_llama)
    with pytest.raises(ValueError, match=r"adapter\(s\) b are merged into the base weights; call lorakit.unmerge"):
        lorakit.set_adapter(tiny_llama, "a")
    with pytest.raises(ValueError, match="merged"):
        lorakit.disable_adapters(tiny_llama)


def test_second_inject_trains_only_the_new_adapter(tiny_llama):
    lorakit.inject(tiny_llama, ["q_proj"], r=2, adapter="first")
    for m in tiny_llama.modules():
        if isinstance(m, LoraLayer):
            m.adapters["first"].requires_grad_(False)
    lorakit.inject(tiny_llama, ["q_proj", "v_proj"], r=2, adapter="second")
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.second." in n for n in trainable)


def test_training_a_frozen_adapter_warns(tiny_llama, tmp_path):
    base = copy.deepcopy(tiny_llama)
    lorakit.inject(tiny_llama, ["q_proj"], r=2)
    randomize(tiny_llama)
    lorakit.save_adapter(tiny_llama, tmp_path, print_fn=lambda s: None)
    ids = torch.randint(0, 120, (2, 8))

    frozen = copy.deepcopy(base)
    lorakit.load_adapter(frozen, tmp_path)
    frozen.train()
    with pytest.warns(UserWarning, match="training with LoRA adapter 'default' frozen, so it will not learn"):
        frozen(ids, labels=ids)

    trainable = copy.deepcopy(base)
    lorakit.load_adapter(trainable, tmp_path, trainable=True)
    trainable.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainable(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in trainable.named_parameters() if p.requires_grad]
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------- combining

def delta(model, name):
    return {n: m.adapters[name].delta_weight() for n, m in model.named_modules()
            if isinstance(m, LoraLayer) and name in m.adapters}


def test_linear_combination_is_exact(tiny_gpt2):
    two_adapters(tiny_gpt2, ["c_fc", {"c_attn": ("q", "v")}])
    lorakit.combine_adapters(tiny_gpt2, {"a": 0.7, "b": -0.3}, "mix")
    da, db, dm = delta(tiny_gpt2, "a"), delta(tiny_gpt2, "b"), delta(tiny_gpt2, "mix")
    assert dm.keys() == da.keys()
    for n in dm:
        torch.testing.assert_close(dm[n], 0.7 * da[n] - 0.3 * db[n], atol=1e-6, rtol=0)
        assert dm[n].abs().max() > 1e-3
    assert "mix" in lorakit.list_adapters(tiny_gpt2) and lorakit.active_adapter(tiny_gpt2) == "b"


def test_svd_combination_is_the_best_rank_k_approximation(tiny_llama):
    two_adapters(tiny_llama, ["q_proj", "o_proj"])
    lorakit.combine_adapters(tiny_llama, {"a": 1.0, "b": 0.5}, "svd", method="svd", r=3)
    da, db, ds = delta(tiny_llama, "a"), delta(tiny_llama, "b"), delta(tiny_llama, "svd")
    for n in ds:
        target = da[n] + 0.5 * db[n]
        sv = torch.linalg.svdvals(target)
        err = torch.linalg.matrix_norm(ds[n] - target)
        torch.testing.assert_close(err, sv[3:].square().sum().sqrt(), atol=1e-5, rtol=1e-4)  # Eckart–Young
        assert torch.linalg.matrix_rank(ds[n], atol=1e-5) == 3
        assert err < torch.linalg.matrix_norm(target)


def test_combine_validates(tiny_llama):
    two_adapters(tiny_llama, ["q_proj"])
    with pytest.raises(ValueError, match="method='svd' needs a rank r >= 1"):
        lorakit.combine_adapters(tiny_llama, {"a": 1.0}, "x", method="svd")
    with pytest.raises(ValueError, match="no adapter 'zzz'"):
        lorakit.combine_adapters(tiny_llama, {"zzz": 1.0}, "x")
    for bad in (float("nan"), float("inf"), "1", None):
        with pytest.raises(ValueError, match=r"weight of adapter 'b' must be a finite number, got"):
            lorakit.combine_adapters(tiny_llama, {"a": 1.0, "b": bad}, "x")
    assert "x" not in lorakit.list_adapters(tiny_llama)
    with pytest.raises(ValueError, match="adapter 'a' already exists"):
        lorakit.combine_adapters(tiny_llama, {"b": 1.0}, "a")


# ---------------------------------------------------------------- mixed batches

def eight_adapters(model, targets):
    for i in range(8):
        lorakit.inject(model, targets, r=2 + i % 3, alpha=4, adapter=f"user{i}")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLayer):
                for a in m.adapters.values():
                    a.lora_a.copy_(torch.randn(a.lora_a.shape, generator=g) * 0.05)
                    a.lora_b.copy_(torch.randn(a.lora_b.shape, generator=g) * 0.05)


def assert_mixed_equals_rowwise(model, ids, names):
    """Row i of the mixed batch equals row i run alone with adapter names[i]."""
    with torch.no_grad(), lorakit.mixed_batch(model, names):
        mixed = model(ids).logits
    outs = []
    for i, name in enumerate(names):
        if name is None:
            lorakit.disable_adapters(model)
        else:
            lorakit.set_adapter(model, name)
        with torch.no_grad():
            outs.append(model(ids[i:i + 1]).logits)
        lorakit.enable_adapters(model)
    alone = torch.cat(outs)
    torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=0)
    assert (alone[0] - alone[1]).abs().max() > 1e-3  # rows really use different adapters


def test_mixed_batch_eight_adapters_tiny_llama(tiny_llama):
    eight_adapters(tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                "embed_tokens"])
    ids = torch.randint(0, 120, (10, 7), generator=torch.Generator().manual_seed(1))
    names = [f"user{i}" for i in range(8)] + [None, "user3"]
    assert_mixed_equals_rowwise(tiny_llama, ids, names)


def test_mixed_batch_eight_adapters_smollm2(smollm2):
    """In float64: in fp32 this 30-layer model's logits move by ~1e-4 between a batch of 9 and
    single rows even without adapters, which would hide what the test checks."""
    smollm2.double()
    eight_adapters(smollm2, ["q_proj", "v_proj"])
    ids = torch.randint(100, 40000, (9, 6), generator=torch.Generator().manual_seed(2))
    assert_mixed_equals_rowwise(smollm2, ids, [f"user{i}" for i in range(8)] + [None])


def test_mixed_batch_follows_adapters_added_changed_and_deleted(tiny_llama):
    """The per-layer bank is kept between batches: it must see an adapter injected later (with a larger
    rank, into a full bank), weights changed in place, and a deleted adapter's slot reused."""
    targets = ["q_proj", "v_proj", "embed_tokens"]
    eight_adapters(tiny_llama, targets)
    ids = torch.randint(0, 120, (4, 6), generator=torch.Generator().manual_seed(3))
    assert_mixed_equals_rowwise(tiny_llama, ids, ["user0", "user1", None, "user2"])
    lorakit.inject(tiny_llama, targets, r=9, alpha=4, adapter="late")
    lorakit.delete_adapter(tiny_llama, "user1")
    with torch.no_grad():
        for m in tiny_llama.modules():
            if isinstance(m, LoraLayer):
                m.adapters["late"].lora_b.normal_(0, 0.05)
                m.adapters["user0"].lora_b.mul_(-2)
    assert_mixed_equals_rowwise(tiny_llama, ids, ["user0", "late", None, "user2"])
    lorakit.inject(tiny_llama, targets, r=3, alpha=4, adapter="reused")
    randomize(tiny_llama)
    assert_mixed_equals_rowwise(tiny_llama, ids, ["reused", "late", "user0", "user3"])
    assert_mixed_equals_rowwise(tiny_llama, ids[:2], ["late", "late"])  # one adapter for every row


def test_mixed_batch_of_adapters_on_different_layers(tiny_llama):
    """A layer adds nothing for a row whose adapter it lacks, however the model's slots have grown since the
    layer's bank was made: here k_proj's bank is made for one adapter, and four more on q_proj only take
    slots past its width."""
    torch.manual_seed(0)
    lorakit.inject(tiny_llama, ["q_proj", "k_proj", "v_proj"], r=4, alpha=8, adapter="wide")
    randomize(tiny_llama)
    ids = torch.randint(0, 120, (6, 5), generator=torch.Generator().manual_seed(4))
    assert_mixed_equals_rowwise(tiny_llama, ids[:2], ["wide", None])
    for i in range(4):
        lorakit.inject(tiny_llama, ["q_proj"], r=2, alpha=4, adapter=f"q{i}")
    randomize(tiny_llama)
    assert_mixed_equals_rowwise(tiny_llama, ids[:2], ["q3", "wide"])  # each row's A and B gathered
    assert_mixed_equals_rowwise(tiny_llama, ids, ["q3", "wide", None, "q0", "q3", "q1"])  # every slot at once


def test_mixed_batch_groups_skewed_and_spread_rows(tiny_llama):
    """Rows grouped by adapter and padded to the largest group: most rows on one adapter (only the named slots
    are taken), every row its own adapter (every slot at once), and one position per row as in decoding."""
    eight_adapters(tiny_llama, ["q_proj", "v_proj", "down_proj"])
    ids = torch.randint(0, 120, (10, 5), generator=torch.Generator().manual_seed(6))
    assert_mixed_equals_rowwise(tiny_llama, ids, ["user2"] * 7 + ["user5", None, "user2"])
    assert_mixed_equals_rowwise(tiny_llama, ids[:9], [f"user{(3 * i) % 8}" for i in range(8)] + [None])
    assert_mixed_equals_rowwise(tiny_llama, ids[:6, :1], ["user1", "user1", "user7", None, "user1", "user0"])


def test_a_stamped_batch_trusts_the_adapters_until_the_stamp_changes(tiny_llama):
    """The serving engine stamps its batches (`Rows(stamp=...)`) and changes adapters only between stamps: under
    one stamp a bank does not look at adapters it has seen again; a new stamp makes it look."""
    from lorakit import mixed
    from lorakit.adapters import holders

    eight_adapters(tiny_llama, ["q_proj", "o_proj"])
    ids = torch.randint(0, 120, (4, 6), generator=torch.Generator().manual_seed(7))
    names = ["user0", "user1", None, "user1"]
    layers = holders(tiny_llama)

    def stamped(stamp):
        rows = mixed.Rows(names, mixed.slots_of(tiny_llama, layers), stamp=stamp)
        for m in layers:
            m.rows = rows
        try:
            with torch.no_grad():
                return tiny_llama(ids).logits
        finally:
            for m in layers:
                m.rows = None

    first = stamped(1)
    with torch.no_grad():
        for m in layers:
            m.adapters["user1"].lora_b.mul_(3)
    assert torch.equal(stamped(1), first)  # the same stamp: not looked at again
    again = stamped(2)
    assert (again - first).abs().max() > 1e-3
    with torch.no_grad(), lorakit.mixed_batch(tiny_llama, names):  # no stamp: always looked at
        torch.testing.assert_close(tiny_llama(ids).logits, again, atol=0, rtol=0)
    assert_mixed_equals_rowwise(tiny_llama, ids, names)


def test_mixed_batch_in_bf16_matches_rows_alone(tiny_llama):
    """Few rows for many adapters (gathered), many rows (all slots at once, masked), one adapter (its block)."""
    eight_adapters(tiny_llama, ["q_proj", "v_proj", "o_proj"])
    randomize(tiny_llama, std=0.3)
    tiny_llama.to(torch.bfloat16)
    ids = torch.randint(0, 120, (18, 6), generator=torch.Generator().manual_seed(4))
    for names in (["user4", None, "user6"], [f"user{i % 8}" for i in range(17)] + [None], ["user5"] * 2):
        check_bf16_rows(tiny_llama, ids[:len(names)], names)


def check_bf16_rows(tiny_llama, ids, names):
    with torch.no_grad(), lorakit.mixed_batch(tiny_llama, names):
        mixed = tiny_llama(ids).logits.float()
    for i, name in enumerate(names):
        lorakit.disable_adapters(tiny_llama) if name is None else lorakit.set_adapter(tiny_llama, name)
        with torch.no_grad():
            alone = tiny_llama(ids[i:i + 1]).logits.float()
        lorakit.enable_adapters(tiny_llama)
        with torch.no_grad():
            lorakit.disable_adapters(tiny_llama)
            base = tiny_llama(ids[i:i + 1]).logits.float()
            lorakit.enable_adapters(tiny_llama)
        error, effect = (mixed[i:i + 1] - alone).abs().max(), (alone - base).abs().max()
        assert error < effect / 10 if name else error < 0.02, (name, error, effect)


def test_mixed_batch_with_modules_to_save(minilm):
    for name in ("pos", "neg"):
        lorakit.inject(minilm, ["query", "value"], r=4, adapter=name, modules_to_save=["classifier"])
        randomize(minilm)
        with torch.no_grad():
            minilm.classifier.adapters[name].weight.normal_()
    ids = torch.randint(1000, 5000, (3, 9))
    with torch.no_grad(), lorakit.mixed_batch(minilm, ["pos", None, "neg"]):
        mixed = minilm(ids).logits
    for i, name in enumerate(["pos", None, "neg"]):
        lorakit.disable_adapters(minilm) if name is None else lorakit.set_adapter(minilm, name)
        with torch.no_grad():
            torch.testing.assert_close(mixed[i:i + 1], minilm(ids[i:i + 1]).logits, atol=1e-5, rtol=0)
        lorakit.enable_adapters(minilm)


def test_mixed_batch_validates(tiny_llama):
    eight_adapters(tiny_llama, ["q_proj"])
    with pytest.raises(ValueError, match="unknown adapter"):
        with lorakit.mixed_batch(tiny_llama, ["nobody"]):
            pass
    with pytest.raises(ValueError, match="mixed batch has 2 rows but 3 adapter names"):
        with lorakit.mixed_batch(tiny_llama, ["user1", "user2", None]):
            tiny_llama(torch.randint(0, 120, (2, 5)))
    assert all(m.rows is None for m in tiny_llama.modules() if isinstance(m, LoraLayer))


def test_loraplus_groups_give_b_the_ratio_of_the_learning_rate(tiny_llama):
    """param_groups: B at lr × ratio, A and other trained weights at lr; one AdamW step then moves every B
    entry ratio times as far as A's (Adam's first step is lr per entry whatever the gradient's size)."""
    lorakit.inject(tiny_llama, ["q_proj", "v_proj"], r=4, alpha=8)
    randomize(tiny_llama)  # B ≠ 0, so A gets a gradient too
    head = tiny_llama.lm_head.weight
    head.requires_grad_(True)
    assert len(lorakit.param_groups(tiny_llama, lr=1e-3)) == 1
    assert lorakit.param_groups(tiny_llama, lr=1e-3)[0]["params"] == [p for p in tiny_llama.parameters() if p.requires_grad]
    groups = lorakit.param_groups(tiny_llama, lr=1e-3, loraplus_ratio=16)
    adapters = [m for m in tiny_llama.modules() if isinstance(m, lorakit.LoraAdapter)]
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    assert {id(p) for p in groups[1]["params"]} == {id(a.lora_b) for a in adapters}
    assert any(p is head for p in groups[0]["params"])
    before = {id(p): p.detach().clone() for g in groups for p in g["params"]}
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    tiny_llama(torch.randint(0, 120, (2, 6))).logits.square().mean().backward()
    optimizer.step()
    moved_a = max((a.lora_a - before[id(a.lora_a)]).abs().max().item() for a in adapters)
    moved_b = max((a.lora_b - before[id(a.lora_b)]).abs().max().item() for a in adapters)
    assert moved_a == pytest.approx(1e-3, rel=1e-3) and moved_b == pytest.approx(16e-3, rel=1e-3)
    with pytest.raises(ValueError, match="loraplus_ratio must be a finite number > 0, got -1"):
        lorakit.param_groups(tiny_llama, lr=1e-3, loraplus_ratio=-1)


def test_lora_fa_groups_hold_b_but_not_the_frozen_a(tiny_llama):
    lorakit.inject(tiny_llama, ["q_proj", "v_proj"], r=4, train_a=False)
    adapters = [m for m in tiny_llama.modules() if isinstance(m, lorakit.LoraAdapter)]
    assert not any(a.lora_a.requires_grad for a in adapters) and all(a.lora_b.requires_grad for a in adapters)
    for ratio in (1, 16):
        grouped = [id(p) for g in lorakit.param_groups(tiny_llama, lr=1e-3, loraplus_ratio=ratio) for p in g["params"]]
        assert sorted(grouped) == sorted(id(a.lora_b) for a in adapters)
    lorakit.inject(tiny_llama, ["up_proj"], r=2, adapter="second")  # a second adapter, A trained: its own setting
    second = [l.adapters["second"] for _, l in lorakit.lora_layers(tiny_llama) if "second" in l.adapters]
    assert all(a.lora_a.requires_grad for a in second)
    lorakit.freeze(tiny_llama, "default")  # back to the first: its config still keeps A frozen
    assert not any(a.lora_a.requires_grad for a in adapters) and all(a.lora_b.requires_grad for a in adapters)
    lorakit.inject(tiny_llama, ["k_proj"], r=2, adapter="dora", dora=True, train_a=False)  # DoRA's m trains too
    dora = [l.adapters["dora"] for _, l in lorakit.lora_layers(tiny_llama) if "dora" in l.adapters]
    assert all(a.magnitude.requires_grad and a.lora_b.requires_grad and not a.lora_a.requires_grad for a in dora)
