"""Layout: ids, segments, padding, positions, decode extension, and errors at the boundary."""

import pytest
import torch

import domainguard as dg
from domainguard.errors import LayoutError

POLICY = """
domainguard: 1
name: layout-test
domains:
  system: {}
  docs:
    children: {public: {}, private: {}}
  answer: {}
reads:
  docs: [system]
  answer: [system, public]
generation: {domain: answer}
positions: {positions}
"""


def compiled(positions="global"):
    return dg.compile(dg.loads_policy(POLICY.replace("{positions}", positions)), layers=2)


class Tok:
    """A stand-in tokenizer: one token per character."""

    bos_token_id = 1
    pad_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_from_ids_attributes():
    c = compiled()
    sy, pu, pr, an = (c.id_of(n) for n in ("system", "public", "private", "answer"))
    ids = torch.tensor([[sy, sy, pu, pr, pu, an]])
    lay = dg.Layout.from_ids(c, ids, end_with_generation=True)
    assert lay.index.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert lay.domain_rank.tolist() == [[0, 1, 0, 0, 1, 0]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert lay.valid.all()


def test_per_domain_positions_hide_other_lengths():
    c = compiled("per_domain")
    sy, pr, an = c.id_of("system"), c.id_of("private"), c.id_of("answer")
    short = dg.Layout.from_ids(c, [[sy, pr, an]])
    long = dg.Layout.from_ids(c, [[sy, pr, pr, pr, pr, an]])
    assert short.position_ids[0, -1] == long.position_ids[0, -1] == 0
    assert long.position_ids.tolist() == [[0, 0, 1, 2, 3, 0]]


def test_reach_positions_count_what_the_token_may_hold():
    c = compiled("reach")
    sy, pu, pr, an = (c.id_of(n) for n in ("system", "public", "private", "answer"))
    # answer (the generation domain) counts system, public and answer tokens — never private ones;
    # every other domain counts its own.
    lay = dg.Layout.from_ids(c, [[sy, sy, pr, pu, pr, pr, pu, an, an]])
    assert lay.position_ids.tolist() == [[0, 1, 0, 0, 1, 2, 1, 4, 5]]
    longer = dg.Layout.from_ids(c, [[sy, sy, pr, pr, pr, pr, pr, pu, pr, pr, pu, an, an]])
    assert longer.position_ids[0, -2:].tolist() == lay.position_ids[0, -2:].tolist()
    # Decoding continues the count; padding counts for nothing.
    ext = dg.Layout.from_ids(c, [[sy, pu, an, c.pad_id], [sy, pr, pu, an]]).extend(2)
    assert ext.position_ids[:, -2:].tolist() == [[3, 4], [3, 4]]
    assert ext.position_ids[1, :4].tolist() == [0, 0, 0, 2]


def test_reach_positions_follow_the_decode_feedback_through_layers():
    # answer reads public, which reads system: after 2 layers answer holds system too, and a generated answer
    # token re-enters at layer 0 with it, so answer counts system tokens; after 1 layer it holds public only.
    text = POLICY.replace("{positions}", "reach").replace("answer: [system, public]", "answer: [public]")
    two = dg.compile(dg.loads_policy(text), layers=2)
    src = two.position_sources
    ids = {n: two.id_of(n) for n in ("system", "public", "private", "answer")}
    assert src[ids["answer"], ids["system"]] and src[ids["answer"], ids["public"]]
    assert not src[ids["answer"], ids["private"]]
    one = dg.compile(dg.loads_policy(text), layers=1)
    assert not one.position_sources[ids["answer"], ids["system"]]
    assert one.position_sources[ids["answer"], ids["public"]]
    for d in ("system", "public", "private"):  # non-generation domains count only themselves
        assert two.position_sources[ids[d]].nonzero().flatten().tolist() == [ids[d]]
    assert not two.position_sources[two.pad_id].any() and not two.position_sources[:, two.pad_id].any()


def test_padding_mask_and_pad_id():
    c = compiled()
    sy, an = c.id_of("system"), c.id_of("answer")
    lay = dg.Layout.from_ids(c, [[sy, an, c.pad_id], [sy, sy, an]], pad_mask=None)
    assert lay.valid.tolist() == [[True, True, False], [True, True, True]]
    assert lay.index[0].tolist() == [0, 1, -1]
    lay2 = dg.Layout.from_ids(c, [[sy, an, sy]], pad_mask=[[False, False, True]])
    assert lay2.domain_ids[0, 2] == c.pad_id


def test_left_padding_indices_start_at_zero():
    c = compiled()
    sy, an = c.id_of("system"), c.id_of("answer")
    lay = dg.Layout.from_ids(c, [[c.pad_id, c.pad_id, sy, an]], end_with_generation=True)
    assert lay.index.tolist() == [[-1, -1, 0, 1]]
    assert lay.position_ids.tolist() == [[0, 0, 0, 1]]


@pytest.mark.parametrize("bad", [-1, 6, 99])
def test_bad_id_names_id_and_row(bad):
    c = compiled()
    ids = torch.zeros(3, 4, dtype=torch.long)
    ids[2, 1] = bad
    with pytest.raises(LayoutError) as e:
        dg.Layout.from_ids(c, ids)
    assert e.value.code == "DG303"
    assert f"domain id {bad}" in str(e.value) and "batch row 2" in str(e.value)


def test_must_end_with_generation():
    c = compiled()
    with pytest.raises(LayoutError) as e:
        dg.Layout.from_ids(c, [[0, 0], [0, c.id_of("answer")]], end_with_generation=True)
    assert e.value.code == "DG304" and "batch row 0" in str(e.value)


def test_from_segments_text_batch_and_generation_token():
    c = compiled()
    lay = dg.Layout.from_segments(
        c,
        [[("system", "ab"), ("public", "xyz")], [("system", "q"), ("answer", "r")]],
        tokenizer=Tok(),
    )
    assert lay.domain_ids.shape == (2, 6)
    row0 = [c.id_of(n) for n in ("system", "system", "public", "public", "public", "answer")]
    assert lay.domain_ids[0].tolist() == row0
    assert lay.input_ids[0].tolist() == [97, 98, 120, 121, 122, 1]  # BOS appended as the generation token
    assert lay.domain_ids[1].tolist()[:2] == [c.id_of("system"), c.id_of("answer")]
    assert lay.domain_ids[1, 2:].eq(c.pad_id).all() and lay.input_ids[1, 2:].eq(0).all()


def test_from_segments_ids_and_errors():
    c = compiled()
    lay = dg.Layout.from_segments(c, [("system", [5, 6]), ("answer", torch.tensor([7]))])
    assert lay.input_ids.tolist() == [[5, 6, 7]]
    with pytest.raises(LayoutError) as e:
        dg.Layout.from_segments(c, [("nope", [1])])
    assert e.value.code == "DG301"
    assert e.value.hint == "Use one of the declared domains."
    with pytest.raises(LayoutError) as e:
        dg.Layout.from_segments(c, [("sytsem", [1])])  # a typo gets the nearest declared name
    assert e.value.code == "DG301" and e.value.hint == "Did you mean 'system'?"
    with pytest.raises(LayoutError) as e:
        c.id_of(None)  # not a name at all: the same error, not a TypeError from the suggestion
    assert e.value.code == "DG301"
    with pytest.raises(LayoutError) as e:
        dg.Layout.from_segments(c, [("system", "text")])
    assert e.value.code == "DG307"
    with pytest.raises(LayoutError) as e:
        dg.Layout.from_segments(c, [("system", [1])])  # needs a generation token id
    assert e.value.code == "DG306"
    lay = dg.Layout.from_segments(c, [("system", [1])], end_with_generation=False)
    assert lay.seq_len == 1


def test_extend_for_decode_continues_each_row():
    c = compiled("per_domain")
    sy, an = c.id_of("system"), c.id_of("answer")
    lay = dg.Layout.from_ids(c, [[sy, an, c.pad_id], [sy, sy, an]])
    ext = lay.extend(2)
    assert ext.domain_ids[:, 3:].eq(an).all()
    assert ext.index.tolist() == [[0, 1, -1, 2, 3], [0, 1, 2, 3, 4]]
    assert ext.domain_rank[:, 3:].tolist() == [[1, 2], [1, 2]]
    assert ext.position_ids[:, 3:].tolist() == [[1, 2], [1, 2]]
    # extending agrees with building the longer layout directly (padding aside)
    direct = dg.Layout.from_ids(c, [[sy, sy, an, an, an]])
    assert torch.equal(direct.index[0], ext.index[1]) and torch.equal(direct.domain_rank[0], ext.domain_rank[1])


def test_q_slice_forms():
    c = compiled()
    lay = dg.Layout.from_ids(c, [[0, 0, 0, c.id_of("answer")]])
    assert lay.attrs(2).index.tolist() == [[2, 3]]
    assert lay.attrs(slice(1, 3)).index.tolist() == [[1, 2]]
    with pytest.raises(LayoutError):
        lay.attrs(9)


@pytest.mark.parametrize("positions", ["global", "per_domain", "reach"])
def test_extend_equals_building_the_longer_layout(positions):
    """Every field of an extended layout equals the one built from all ids at once (padding, all
    three position modes, several steps), so decoding may extend instead of rebuilding."""
    c = compiled(positions)
    an, pad = c.id_of("answer"), c.pad_id
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, pad, (3, 17), generator=g)
    ids[0, 3:6] = pad  # padding inside a row
    ids[1, :4] = pad  # left padding
    ids[:, -1] = an
    lay = dg.Layout.from_ids(c, ids)
    full = ids
    for n_new in (1, 1, 3, 0, 2):
        lay = lay.extend(n_new)
        full = torch.cat([full, torch.full((3, n_new), an)], 1)
        direct = dg.Layout.from_ids(c, full)
        for name in ("domain_ids", "index", "position_ids", "domain_rank", "valid"):
            a, b = getattr(lay, name), getattr(direct, name)
            assert a.dtype == b.dtype and torch.equal(a, b), (positions, n_new, name)


def test_a_layout_keeps_its_own_labels():
    c = dg.compile(dg.loads_policy("domainguard: 1\nname: t\ndomains: {a: {}, b: {}}\nreads: {b: [a]}\n"), layers=1)
    ids = torch.tensor([[0, 0, 1, 1]])
    lay = dg.Layout.from_ids(c, ids)
    ids[0, 0] = 1  # the caller's tensor, changed after the layout was made
    assert lay.domain_ids.tolist() == [[0, 0, 1, 1]]
