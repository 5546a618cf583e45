"""Checks of a written report.html shared by the tests that produce one."""

from __future__ import annotations

import base64
import re
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_report(path: Path, sections: list[str], min_images: int) -> str:
    """The report holds every section, and every embedded image is a whole PNG; returns the HTML."""
    text = path.read_text()
    assert text.startswith("<!doctype html>") and text.rstrip().endswith("</html>")
    for section in sections:
        assert f"id='{section}'" in text, f"section {section} missing from {path}"
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) >= min_images
    for data in images:
        png = base64.b64decode(data)
        assert png.startswith(PNG_MAGIC) and png.endswith(b"IEND\xaeB`\x82")
    assert "http://" not in text and "https://" not in text  # opens offline: nothing fetched
    return text
