import io

import pytest
from PIL import Image

from dermaray.data.corruption import corrupt_image, decompression_bomb_png
from dermaray.data.validate import RowRejected, inspect_image, parse_age, parse_attribute, parse_number

LIMITS = {"max_pixels": 4096 * 4096, "max_bytes": 1 << 20}


def _jpeg(size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 40).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


def test_good_jpeg_and_png():
    assert inspect_image(_jpeg(), **LIMITS).width == 64
    buffer = io.BytesIO()
    Image.new("RGB", (10, 20)).save(buffer, format="PNG")
    info = inspect_image(buffer.getvalue(), **LIMITS)
    assert (info.format, info.width, info.height) == ("PNG", 10, 20)


@pytest.mark.parametrize(
    "blob, reason",
    [
        (None, "image_missing"),
        (b"", "empty_image"),
        (b"GIF89a-not-really" + bytes(100), "not_an_image"),
        (b"%PDF-1.4 not an image", "not_an_image"),
        (corrupt_image("truncated_image", _jpeg()), "truncated_image"),
        (decompression_bomb_png(), "decompression_bomb"),
        (b"\xff" * (2 << 20), "image_too_large"),
    ],
)
def test_bad_images_are_rejected_with_reason(blob, reason):
    with pytest.raises(RowRejected) as caught:
        inspect_image(blob, **LIMITS)
    assert caught.value.reason == reason


@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_cut_anywhere_in_its_data_is_truncated_though_checked_at_reduced_scale(progressive):
    buffer = io.BytesIO()
    Image.effect_noise((450, 300), 60).convert("RGB").save(buffer, format="JPEG", quality=90, progressive=progressive)
    blob = buffer.getvalue()
    info = inspect_image(blob, **LIMITS)
    assert (info.format, info.width, info.height) == ("JPEG", 450, 300)  # the declared size, not the decoded one
    for fraction in (0.3, 0.7, 0.95, 0.995):
        with pytest.raises(RowRejected) as caught:
            inspect_image(blob[: int(len(blob) * fraction)], **LIMITS)
        assert caught.value.reason == "truncated_image", fraction


def test_bomb_is_small_on_disk_but_huge_declared():
    assert len(decompression_bomb_png()) < 100_000
    assert corrupt_image("truncated_image", b"abcd") == b"ab"


def test_declared_size_limit_is_configurable():
    with pytest.raises(RowRejected, match="decompression_bomb"):
        inspect_image(_jpeg((200, 200)), max_pixels=100 * 100, max_bytes=1 << 20)


@pytest.mark.parametrize(
    "value, reason", [("NaN", "invalid_value"), ("-3.2", "invalid_value"), ("big", "invalid_value"), ("", "missing_value")]
)
def test_required_attribute_rejections(value, reason):
    with pytest.raises(RowRejected) as caught:
        parse_attribute("area_mm2", value, required=True)
    assert caught.value.reason == reason


def test_values_parse():
    assert parse_attribute("eccentricity", "0.5", required=True) == 0.5
    assert parse_attribute("area_mm2", "", required=False) is None
    with pytest.raises(RowRejected, match="not finite"):
        parse_number("x", "inf")
    with pytest.raises(RowRejected):
        parse_attribute("eccentricity", "1.5", required=True)
    with pytest.raises(RowRejected):
        parse_age("forty")
    assert parse_age("45") == 45.0 and parse_age(" ") is None
