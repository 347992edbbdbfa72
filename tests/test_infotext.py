"""A1111 infotext: build/parse round trips and real A1111/Forge infotexts with extra fields."""
import pytest

from sdlora.infotext import Infotext, build, parse


def test_round_trip_plain():
    params = {"Steps": "20", "Sampler": "DPM++ 2M Karras", "CFG scale": "7", "Seed": "42", "Size": "64x64",
              "Model hash": "0123456789", "Model": "tiny-sd", "Version": "sdlora 0.1.0"}
    text = build("a red circle <lora:neon:0.8>", "blurry, ugly", params)
    assert text == ("a red circle <lora:neon:0.8>\nNegative prompt: blurry, ugly\n"
                    "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 64x64, "
                    "Model hash: 0123456789, Model: tiny-sd, Version: sdlora 0.1.0")
    info = parse(text)
    assert (info.prompt, info.negative_prompt, info.params) == ("a red circle <lora:neon:0.8>", "blurry, ugly", params)


def test_round_trip_quoting_and_multiline():
    params = {"Steps": "5", "Seed": "1", "Lora hashes": "neon: 0123456789ab, toon style: ba9876543210",
              "Odd": 'has "quotes", commas: and colons', "Size": "64x32"}
    info = Infotext("line one,\nline two: with colon", "neg one\nneg two", params)
    text = info.build()
    assert 'Lora hashes: "neon: 0123456789ab, toon style: ba9876543210"' in text  # A1111 quotes it
    back = parse(text)
    assert back == info
    assert back.lora_hashes == {"neon": "0123456789ab", "toon style": "ba9876543210"}
    assert back.size == (64, 32)


def test_no_negative_prompt_and_no_params():
    assert parse(build("just a prompt")) == Infotext("just a prompt", "", {})
    assert parse("a: b, c: d") == Infotext("a: b, c: d", "", {})  # fewer than 3 pairs: still prompt


A1111_V1_10 = """masterpiece, 1girl, <lora:add_detail:0.5>, (blue hair:1.2)
Negative prompt: (worst quality:2), lowres,
bad hands
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3288957233, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, \
Hires upscale: 1.5, Hires steps: 10, Hires upscaler: R-ESRGAN 4x+ Anime6B, \
Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "EasyNegative: c74b4e810b03", \
ADetailer prompt: "face, smile", Version: v1.10.1"""


def test_parse_a1111_with_extra_fields():
    info = parse(A1111_V1_10)
    assert info.prompt == "masterpiece, 1girl, <lora:add_detail:0.5>, (blue hair:1.2)"
    assert info.negative_prompt == "(worst quality:2), lowres,\nbad hands"
    assert info.params["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B"
    assert info.params["ADetailer prompt"] == "face, smile"
    assert info.params["TI hashes"] == "EasyNegative: c74b4e810b03"
    assert info.lora_hashes == {"add_detail": "7c6bad76eb54"}
    assert info.settings() == {"prompt": info.prompt, "negative": info.negative_prompt, "steps": 28, "cfg": 6.5,
                               "seed": 3288957233, "sampler": "DPM++ 2M Karras", "width": 512, "height": 768}
    # rebuilding keeps every field, in order
    assert parse(info.build()) == info
    assert list(info.params)[:4] == ["Steps", "Sampler", "Schedule type", "CFG scale"]


@pytest.mark.parametrize("sampler,schedule,expected", [
    ("Euler a", None, "Euler a"), ("DPM++ 2M Karras", None, "DPM++ 2M Karras"),
    ("DPM++ 2M", "Karras", "DPM++ 2M Karras"), ("Euler a", "Automatic", "Euler a"),
    ("DPM++ 2M", "Exponential", "DPM++ 2M"), ("Some New Sampler", None, "Some New Sampler")])
def test_sampler_with_schedule_type(sampler, schedule, expected):
    params = {"Steps": "1", "Sampler": sampler, "Seed": "1"}
    if schedule:
        params["Schedule type"] = schedule
    assert parse(build("p", "", params)).sampler == expected
