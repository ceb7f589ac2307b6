"""The server-rendered SVG ratings chart."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

from proxy.humaneval.charts import ChartRow, ratings_svg

SVG = "{http://www.w3.org/2000/svg}"


class TestRatingsSvg:
    def test_one_row_per_model_with_whiskers(self) -> None:
        """Each row has a label, a dot and an interval; the SVG parses and is titled for screen readers."""
        svg = ratings_svg([ChartRow("a", 1550, 1500, 1600), ChartRow("b", 1450, 1400, 1510)], title="Ratings")
        root = ET.fromstring(svg)
        assert root.get("role") == "img" and root.find(f"{SVG}title").text == "Ratings"  # type: ignore[union-attr]
        assert len(root.findall(f"{SVG}circle")) == 2
        labels = [t.text for t in root.findall(f"{SVG}text")]
        assert "a" in labels and "b" in labels and "1550" in labels and "1500" in labels  # 1500: an axis tick

    def test_text_is_escaped_and_no_inline_style(self) -> None:
        """Model names are escaped; only presentation attributes, so a strict CSP still draws it."""
        svg = ratings_svg([ChartRow("<script>x</script>", 1500)], title="t & u")
        assert "<script>" not in svg and "&lt;script&gt;" in svg and "t &amp; u" in svg
        assert "style=" not in svg
        ET.fromstring(svg)

    def test_missing_or_infinite_intervals(self) -> None:
        """A row without a finite interval is a dot alone; nothing at all gives an empty string."""
        svg = ratings_svg([ChartRow("a", 1500, math.nan, math.nan), ChartRow("b", 1520, None, None)], title="t")
        root = ET.fromstring(svg)
        assert len(root.findall(f"{SVG}circle")) == 2
        assert ratings_svg([], title="t") == ""

    def test_points_are_ordered_on_the_axis(self) -> None:
        """A higher rating is drawn further right."""
        root = ET.fromstring(ratings_svg([ChartRow("hi", 1700), ChartRow("lo", 1300)], title="t"))
        hi, lo = (float(c.get("cx", "nan")) for c in root.findall(f"{SVG}circle"))
        assert hi > lo
