"""CTF auxiliary model: one bidirectional pass gives every position's fine-label logits."""
from __future__ import annotations

import pytest
import torch

from visar.generators.coarse_to_fine.auxiliary import AuxiliaryModel

M, V, K, G = 8, 32, 5, 4  # clusters, codewords, classes, grid side


def _aux(seed=0):
    torch.manual_seed(seed)
    aux = AuxiliaryModel(num_clusters=M, vocab_size=V, num_classes=K, grid_size=G, dim=32, depth=2, num_heads=2,
                         ffn_hidden=64).eval()
    for p in aux.parameters():  # the output head starts at zero: give it weights so logits differ
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    return aux


def _inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(M, (b, G * G), generator=g), torch.tensor([0, 4, K][:b])


def test_batched_pass_equals_per_position_and_per_row_evaluation():
    aux, (coarse, labels) = _aux(), _inputs()
    with torch.no_grad():
        full = aux(coarse, labels)  # [B, N, V]
        assert full.shape == (3, G * G, V) and full.dtype == torch.float32
        for i in range(G * G):  # one position at a time
            one = aux(coarse, labels, positions=torch.tensor([i]))
            torch.testing.assert_close(one[:, 0], full[:, i], rtol=1e-5, atol=1e-5)
        for b in range(3):  # one image at a time
            torch.testing.assert_close(aux(coarse[b:b + 1], labels[b:b + 1])[0], full[b], rtol=1e-5, atol=1e-5)


def test_attention_is_bidirectional():
    aux, (coarse, labels) = _aux(), _inputs()
    changed = coarse.clone()
    changed[:, -1] = (changed[:, -1] + 1) % M  # change only the LAST coarse label
    with torch.no_grad():
        a, b = aux(coarse, labels), aux(changed, labels)
    # a causal model would leave position 0 unchanged; the auxiliary model sees the whole sequence
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4


def test_class_conditions_the_logits_and_dropout_uses_the_null_class():
    aux, (coarse, labels) = _aux(), _inputs()
    with torch.no_grad():
        a = aux(coarse, labels)
        b = aux(coarse, (labels + 1) % (K + 1))
        null = aux(coarse, torch.full_like(labels, K))
        dropped = aux(coarse, labels, drop_prob=1.0)
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(dropped, null)


def test_wrong_sequence_length_is_a_clear_error():
    aux = _aux()
    with pytest.raises(ValueError, match="expects 16 coarse labels"):
        aux(torch.zeros(1, 15, dtype=torch.long), torch.zeros(1, dtype=torch.long))
