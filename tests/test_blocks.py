"""LoRA Block Weight lists, presets and slots, against hako-mikan/sd-webui-lora-block-weight.

The expectations below are copied from that project's scripts/lora_block_weight.py
(BLOCKID12/17/20/26 and DEF_WEIGHT_PRESET), read at commit b403cb7.
"""
import pytest

from sdlora.blocks import LISTS, PRESETS, SLOTS, block_weight, parse_lbw
from sdlora.errors import SdloraError
from sdlora.families import load_config

LBW_BLOCKID17 = "BASE,IN01,IN02,IN04,IN05,IN07,IN08,M00,OUT03,OUT04,OUT05,OUT06,OUT07,OUT08,OUT09,OUT10,OUT11"
LBW_BLOCKID12 = "BASE,IN04,IN05,IN07,IN08,M00,OUT00,OUT01,OUT02,OUT03,OUT04,OUT05"
LBW_BLOCKID20 = ("BASE,IN00,IN01,IN02,IN03,IN04,IN05,IN06,IN07,IN08,M00,"
                 "OUT00,OUT01,OUT02,OUT03,OUT04,OUT05,OUT06,OUT07,OUT08")
LBW_PRESETS = """NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"""


def test_lists_and_presets_are_lbws():
    assert len(SLOTS) == 26 and SLOTS[0] == "BASE" and SLOTS[13] == "M00" and SLOTS[-1] == "OUT11"
    assert LISTS[17] == tuple(LBW_BLOCKID17.split(","))
    assert LISTS[12] == tuple(LBW_BLOCKID12.split(","))
    assert LISTS[20] == tuple(LBW_BLOCKID20.split(","))
    assert LISTS[26] == SLOTS
    want = {line.split(":")[0]: tuple(float(v) for v in line.split(":")[1].split(",")) for line in LBW_PRESETS.splitlines()}
    assert PRESETS == want


def test_short_lists_leave_unnamed_slots_at_zero():
    w = parse_lbw("OUTALL")
    assert w["BASE"] == 1 and all(w[f"OUT{i:02d}"] == 1 for i in range(3, 12))
    assert all(w[s] == 0 for s in ("IN00", "IN01", "IN03", "IN11", "M00", "OUT00", "OUT02"))
    xl = parse_lbw(",".join(str(i) for i in range(12)))               # SDXL 12-list
    assert [xl[s] for s in LISTS[12]] == list(range(12)) and xl["IN01"] == 0 and xl["OUT06"] == 0
    full = parse_lbw([0.5] * 26)
    assert set(full.values()) == {0.5}
    named = parse_lbw({"OUT03": 0.2, "BASE": 0})                      # a mapping: others stay 1
    assert named["OUT03"] == 0.2 and named["BASE"] == 0 and named["IN01"] == 1
    assert parse_lbw(" all0.5 ") == parse_lbw("ALL0.5") and parse_lbw("1," * 16 + "-1")["OUT11"] == -1


@pytest.mark.parametrize("spec, text", [
    ("1,2,3", "3 values"), ("FOO", "not a preset"), ("1,x" + ",1" * 15, "not a number"),
    ([1.0] * 16, "16 values"), ({"IN12": 1}, "unknown slot"), ("inf" + ",1" * 16, "finite"),
])
def test_bad_specs_say_what_is_expected(spec, text):
    with pytest.raises(SdloraError, match=text) as e:
        parse_lbw(spec)
    assert "12, 17, 20 or 26" in str(e.value)


def test_slots_of_modules():
    sd1, xl = load_config("sd1", "unet"), load_config("sdxl", "unet")
    w = dict(zip(SLOTS, range(26)))
    cases = [  # (path, unet config, slot by hand, docs/formats.md "Block weights"; None: outside every block)
        ("text_encoder.text_model.encoder.layers.5.self_attn.q_proj", sd1, "BASE"),
        ("text_encoder_2.text_model.encoder.layers.5.mlp.fc1", xl, "BASE"),
        ("unet.conv_in", sd1, "IN00"),
        ("unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k", sd1, "IN02"),
        ("unet.down_blocks.1.downsamplers.0.conv", sd1, "IN06"),
        ("unet.down_blocks.3.resnets.0.conv1", sd1, "IN10"),
        ("unet.mid_block.resnets.0.conv1", sd1, "M00"),
        ("unet.up_blocks.0.resnets.1.conv2", sd1, "OUT01"),
        ("unet.up_blocks.2.attentions.2.proj_out", sd1, "OUT08"),
        ("unet.up_blocks.3.attentions.0.transformer_blocks.0.ff.net.2", sd1, "OUT09"),
        ("unet.time_embedding.linear_1", sd1, None),
        ("unet.conv_out", sd1, None),
        ("unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q", xl, "IN04"),
        ("unet.down_blocks.2.attentions.1.proj_in", xl, "IN08"),
        ("unet.up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_v", xl, "OUT02"),
        ("unet.up_blocks.1.upsamplers.0.conv", xl, "OUT05"),
        ("unet.up_blocks.2.resnets.2.conv1", xl, "OUT08"),
        ("unet.add_embedding.linear_1", xl, None),
    ]
    for path, cfg, slot in cases:
        assert block_weight(w, path, cfg) == (1.0 if slot is None else w[slot]), path
