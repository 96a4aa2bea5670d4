"""DICOM in (analysis.image_files): files written here with pydicom -- MONOCHROME1 and MONOCHROME2, 8 and 16 bits,
rescale slope/intercept and a window -- become the same model input as the PNG they were made from, through
`analysis.predict`; broken or unsupported DICOM is one line. All on a hand-made export (no search): about 2 s."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import toy_dataset
from PIL import Image
from test_analysis import hand_export, run_main, write_pngs

from analysis import predict
from analysis.image_files import read_image
from trainables.data.image_cache import decode_image
from trainables.errors import UserError

pydicom = pytest.importorskip("pydicom", reason="the export extra: pip install -e '.[export]'")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless  # noqa: E402


def dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int | None = None, **tags):
    """A DICOM Part 10 file (digital X-ray storage) holding `pixels` as stored values, plus any `tags`."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.set_pixel_data(pixels, photometric, bits or pixels.dtype.itemsize * 8)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def predicted(folder, *paths) -> list[dict]:
    code, stdout, stderr = run_main(predict, "--model", folder, "--json", *paths)
    assert code == 0, stderr
    return [json.loads(line)["probabilities"] for line in stdout.splitlines()]


def test_a_dicom_of_a_pngs_pixels_predicts_what_the_png_does_in_both_photometric_interpretations(tmp_path):
    """8-bit MONOCHROME2 of the PNG's pixels, MONOCHROME1 of the inverted pixels (white = low) and the same file
    named .png or sent as bytes: the PNG's probabilities to the last bit."""
    folder = hand_export(tmp_path / "export")
    images = toy_dataset("multiclass").test.images[:3]
    images[:, :, :4] = 255  # a white band: the inversion must bring it back
    pngs = write_pngs(images, tmp_path / "png")
    mono2 = [dicom(tmp_path / f"{i}.dcm", image[..., 0]) for i, image in enumerate(images)]
    mono1 = [dicom(tmp_path / f"{i}_m1.dcm", 255 - image[..., 0], "MONOCHROME1") for i, image in enumerate(images)]
    disguised = dicom(tmp_path / "a_dicom.png", images[0, ..., 0])  # by content, not by name
    expected = predicted(folder, *pngs)
    assert predicted(folder, *mono2) == expected and predicted(folder, *mono1) == expected
    assert predicted(folder, disguised, *pngs[1:]) == expected  # (one batch of three, as above: the same arithmetic)
    assert len({json.dumps(p) for p in expected}) == 3  # three different images, three different answers
    model = predict.ExportedModel(folder)
    assert np.array_equal(model.tensor(mono1[1].read_bytes()), model.tensor(pngs[1]))  # what a served model gets


def test_a_16_bit_dicom_with_rescale_and_window_is_the_windowed_8_bit_image(tmp_path):
    """Stored values s, rescale 4 s - 1024 (Hounsfield-like), window centre 3040.5 width 4081 (LINEAR: values
    1000..5080 onto black..white): equal to the 8-bit image the window shows, computed here by the standard's
    formula, and dark or bright values beyond the window clip. A VOI LUT's entries map onto 0..255 by their bit depth.
    Without either, a 16-bit image is stretched min-to-max, as the training images' cache stretches a 16-bit PNG."""
    rng = np.random.default_rng(0)
    shown = rng.integers(0, 256, (20, 24)).astype(np.uint8)
    stored = (506 + 4 * shown.astype(np.int64)).astype(np.uint16)  # 4 * stored - 1024 = 1000 + 16 * shown
    stored[0, :3] = [0, 60000, 300]  # far below and far above the window, then just below it
    path = dicom(tmp_path / "window.dcm", stored, bits=16, RescaleSlope=4, RescaleIntercept=-1024,
                 WindowCenter=3040.5, WindowWidth=4081)
    values = 4.0 * stored - 1024  # PS3.3 C.11.2.1.2.1, LINEAR, onto 0..255
    c, w = 3040.5 - 0.5, 4081 - 1.0
    expected = np.clip(np.round(((values - c) / w + 0.5) * 255), 0, 255).astype(np.uint8)
    assert np.array_equal(expected[1:], shown[1:]) and list(expected[0, :3]) == [0, 255, 0]
    assert np.array_equal(read_image(path, 24, "L")[..., 0], np.asarray(Image.fromarray(expected).resize((24, 24),
                                                                                                    Image.Resampling.BILINEAR)))
    # the same through predict: the windowed 8-bit image as a PNG
    folder = hand_export(tmp_path / "export")
    Image.fromarray(expected).save(tmp_path / "windowed.png")
    assert predicted(folder, path) == predicted(folder, tmp_path / "windowed.png")
    # a VOI LUT instead of the window (12-bit input, 16-bit entries, a square-root curve): its 0..65535 onto 0..255
    twelve = rng.integers(0, 4096, (16, 16)).astype(np.uint16)
    curve = np.round(65535 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)
    lut = Dataset()
    lut.LUTDescriptor, lut.LUTData = [4096, 0, 16], curve.tolist()
    lut["LUTData"].VR = "US"
    lutted = dicom(tmp_path / "lut.dcm", twelve, bits=12, VOILUTSequence=[lut])
    shown = np.round(curve[twelve] * (255 / 65535)).astype(np.uint8)
    assert np.array_equal(read_image(lutted, 16, "L")[..., 0], shown)
    # no window, 12 bits used of 16: stretched like a 16-bit PNG
    deep = rng.integers(100, 4000, (16, 16)).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # PIL writes a 16-bit greyscale PNG
    assert np.array_equal(read_image(dicom(tmp_path / "deep.dcm", deep, bits=12), 16, "L"),
                          decode_image(tmp_path / "deep.png", 16, "L"))
    # an RLE-compressed file (pydicom decodes RLE itself) reads as its uncompressed twin
    ds = pydicom.dcmread(tmp_path / "deep.dcm")
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm")
    assert np.array_equal(read_image(tmp_path / "rle.dcm", 16, "RGB"), read_image(tmp_path / "deep.dcm", 16, "RGB"))


def test_dicom_without_pixels_compressed_without_a_decoder_or_multi_frame_is_one_line(tmp_path):
    folder = hand_export(tmp_path / "export")
    pixels = np.zeros((8, 8), np.uint8)
    no_pixels = dicom(tmp_path / "report.dcm", pixels)
    ds = pydicom.dcmread(no_pixels)
    del ds.PixelData
    ds.save_as(no_pixels)
    jpeg_ls = dicom(tmp_path / "jpegls.dcm", pixels)
    ds = pydicom.dcmread(jpeg_ls)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless  # no JPEG-LS decoder is installed (pylibjpeg, gdcm, pyjpegls)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7 not decoded"])
    ds.save_as(jpeg_ls)
    frames = dicom(tmp_path / "frames.dcm", np.zeros((3, 8, 8), np.uint8), NumberOfFrames=3)
    (tmp_path / "truncated.dcm").write_bytes(no_pixels.read_bytes()[:140])
    for path, said in ((no_pixels, "has no pixel data"), (jpeg_ls, "compressed as JPEG-LS Lossless Image Compression"),
                       (frames, "holds 3 frames; pass one image per file"),
                       (tmp_path / "truncated.dcm", "truncated.dcm")):
        code, stdout, stderr = run_main(predict, "--model", folder, path)
        assert code == 2 and stdout == "" and stderr.count("\n") == 1, stderr
        assert said in stderr and str(path) in stderr
    assert "install one (" in run_main(predict, "--model", folder, jpeg_ls)[2]
    with pytest.raises(UserError, match="Cannot read image the image bytes"):
        read_image(b"neither a PNG nor DICOM" * 10, 16, "L")


def test_dicom_without_pydicom_names_the_extra(tmp_path, monkeypatch):
    """`pip install -e .` alone: PNG still reads, a DICOM file is one line naming the export extra."""
    path = dicom(tmp_path / "a.dcm", np.zeros((8, 8), np.uint8))
    png = write_pngs(np.zeros((1, 8, 8, 1), np.uint8), tmp_path / "png")[0]
    monkeypatch.setitem(sys.modules, "pydicom", None)  # `import pydicom` now fails as if it were not installed
    with pytest.raises(UserError, match=r"reading DICOM needs pydicom \(pip install -e '\.\[export\]'\)"):
        read_image(path, 8, "L")
    assert read_image(png, 8, "L").shape == (8, 8, 1)
