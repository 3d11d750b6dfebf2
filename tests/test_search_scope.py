"""``IndexReads`` without Ray: which paths an index may make bitray read (the pipeline-backed cases are in
test_search_duplicates.py)."""

from __future__ import annotations

import pytest

from bitray import outputs
from bitray.errors import BitrayError
from bitray.search.scope import DEFAULT_MAX_BYTES, IndexReads


def test_a_manifest_runs_lines_are_its_inputs_and_no_cap_means_the_default(tmp_path, monkeypatch):
    listing = tmp_path / "inputs.txt"
    photo = tmp_path / "photos" / "a.jpg"
    photo.parent.mkdir()
    photo.write_bytes(b"jpeg")
    listing.write_text(f"# inputs\n{photo}\ns3://bucket/more/\ngcs://other/p\n")
    recorded = outputs.RecordedInputs(
        prefixes=["s3://bucket/photos"], manifests=[str(listing)], max_bytes=None
    )
    monkeypatch.setattr(outputs, "recorded_inputs", lambda output, storage=None: recorded)
    reads = IndexReads.of_output("s3://bucket/out")
    assert reads.max_bytes == DEFAULT_MAX_BYTES
    for uri in (str(photo), "s3://bucket/more/x.jpg", "s3://bucket/photos/y.jpg", "gs://other/p/z.jpg"):
        assert reads.allows(uri), uri
    for uri in ("s3://bucket/photosX/y.jpg", "s3://bucket/out/z.jpg", str(tmp_path / "photos" / "b.jpg")):
        assert not reads.allows(uri), uri
    assert reads.read(str(photo)) == b"jpeg"
    with pytest.raises(BitrayError, match="not under the inputs of 's3://bucket/out'"):
        reads.read(str(listing))
    assert reads.allow(str(listing)).read(str(listing)).startswith(b"# inputs")  # a path the user named
