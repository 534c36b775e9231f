"""The documentation site: the generated config and API reference cover the code, the pages' file references exist,
and the site builds with ``mkdocs build --strict`` (a broken link or an unresolved API name fails)."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hf_vq
from hf_vq.config import GPTQConfig
from hf_vq.config.base import HfVQConfig
from hf_vq.config.schema import Bool, Field

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _hook():
    spec = importlib.util.spec_from_file_location("docs_generated_pages", DOCS / "hooks" / "generated_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HOOK = _hook()
CLASSES = list(HfVQConfig._registry.values())


def _row(section: str, name: str) -> str:
    rows = [line for line in section.splitlines() if line.startswith(f"| `{name}` |")]
    assert len(rows) == 1, f"field {name!r}: {len(rows)} rows in its table"
    return rows[0]


def test_every_registered_config_class_has_a_section():
    text = HOOK.render_config_reference()
    names = {cls.__name__ for cls in CLASSES}
    assert names >= {"RTNConfig", "GPTQConfig", "GPTVQConfig", "AdaScaleConfig", "QuantSimConfig"}
    assert set(re.findall(r"^## (\w+)$", text, flags=re.M)) == names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_config_reference_lists_every_field_with_its_default_check_and_doc(cls):
    section = HOOK.section(HOOK.render_config_reference(), cls.__name__)
    table_fields = re.findall(r"^\| `(\w+)` \| (?!why)", section, flags=re.M)
    fields = cls.schema.fields
    assert [n for n in table_fields if n in fields] == list(fields)
    for name, f in fields.items():
        row = _row(section, name)
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
        assert cells[0] == f"`{name}`"
        assert cells[2].replace("\\|", "|") == f.check.what
        assert cells[3] == f"`{f.default!r}`"
        assert cells[5].replace("\\|", "|") == f.doc.replace("\n", " ")
    for name in cls.schema.refused:
        assert f"| `{name}` | " in section.split("refuses", 1)[1], f"refused field {name!r} missing"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_config_field_has_a_doc(cls):
    missing = [name for name, f in cls.schema.fields.items() if not f.doc.strip()]
    assert not missing, f"{cls.__name__}: fields without Field.doc (fill it in hf_vq/config/): {missing}"


def test_a_new_schema_field_shows_up_in_the_reference():
    class WithExtraField(GPTQConfig):
        method = ""  # not registered: other tests see the real registry
        schema = GPTQConfig.schema.extend(extra_switch=Field(Bool(), True, doc="a field only this test declares"))

    section = HOOK.render_class(WithExtraField)
    assert "| `extra_switch` | bool | True or False | `True` | yes | a field only this test declares |" in section
    assert "extra_switch" not in HOOK.render_config_reference()


def test_api_reference_documents_every_export():
    text = HOOK.render_api_reference()
    documented = re.findall(r"^::: hf_vq\.(\w+)$", text, flags=re.M)
    assert documented == list(hf_vq.__all__)


def _pages():
    return sorted(p for p in DOCS.rglob("*.md"))


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [str(p.relative_to(DOCS)) for p in _pages() if f" {p.relative_to(DOCS).as_posix()}\n" not in nav]
    assert not missing


def test_files_and_tests_the_pages_cite_exist():
    """A claim names the test or benchmark that shows it: each cited path exists, and each cited test is defined."""
    cited = 0
    for page in _pages():
        text = page.read_text()
        for path, test in re.findall(r"`((?:tests|integration_tests|benchmarks|examples)/[\w/.-]+\.(?:py|md|sh))"
                                     r"(?:::(\w+))?", text):
            cited += 1
            target = ROOT / path
            assert target.is_file(), f"{page.name} cites {path}, which does not exist"
            if test:
                assert re.search(rf"^\s*(?:async )?def {test}\(|^class {test}\b", target.read_text(), re.M), \
                    f"{page.name} cites {path}::{test}, which is not defined there"
    assert cited > 20


def test_pages_do_not_narrate_work_history():
    pattern = re.compile(r"\b(we|our|us|session|so far|the default since)\b", re.I)
    hits = []
    for page in _pages():
        for i, line in enumerate(page.read_text().splitlines(), 1):
            if not line.startswith("    ") and pattern.search(re.sub(r"`[^`]*`", "", line)):
                hits.append(f"{page.relative_to(DOCS)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_site_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    assert mkdocs, "mkdocs is not installed: pip install 'hf_vq[docs]' (the test extra includes it)"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    html = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    for cls in CLASSES:
        for name in cls.schema.fields:
            assert f"<code>{name}</code>" in html, f"{cls.__name__}.{name} missing from the built config page"
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    for name in hf_vq.__all__:
        assert f'id="hf_vq.{name}"' in api, f"hf_vq.{name} missing from the built API page"


QUOTED_CONFIG_ERRORS = [
    (lambda: hf_vq.GPTQConfig(sym="no"), "GPTQConfig: sym must be True or False, got 'no' (str)"),
    (lambda: hf_vq.GPTQConfig(bits=4.0), "GPTQConfig: bits must be one of (2, 3, 4, 8), got 4.0 (float)"),
    (lambda: hf_vq.GPTQConfig(modules_to_not_convert="q_proj"),
     "GPTQConfig: modules_to_not_convert must be a list of strings, got the string 'q_proj': write ['q_proj']"),
    (lambda: hf_vq.QuantSimConfig(bits=4),
     "QuantSimConfig does not take 'bits': QuantSim's weight bit width is weight_bits"),
    (lambda: hf_vq.RTNConfig(dataset=["x"]),
     "RTNConfig does not take 'dataset': round-to-nearest uses no calibration data"),
    (lambda: hf_vq.GPTQConfig(bitz=4), "GPTQConfig got unknown arguments: ['bitz']"),
    (lambda: hf_vq.GPTQConfig(4), "GPTQConfig: pass config fields by keyword (got 1 positional argument(s))"),
    (lambda: hf_vq.GPTVQConfig(cols_per_block=255),
     "GPTVQConfig: cols_per_block (255) must be a multiple of vector_dim (2): a vector may not straddle two codebooks"),
    (lambda: hf_vq.GPTQConfig(lm_head_bits=8, modules_to_not_convert=["lm_head"]),
     "GPTQConfig: lm_head_bits=8 quantizes lm_head, which modules_to_not_convert keeps in float: drop one of them"),
    (lambda: hf_vq.GPTQConfig(format_version=2),
     "checkpoint format_version 2 is newer than this hf_vq supports (1); upgrade hf_vq"),
]


@pytest.mark.parametrize("make, quoted", QUOTED_CONFIG_ERRORS, ids=[q[:40] for _, q in QUOTED_CONFIG_ERRORS])
def test_troubleshooting_quotes_the_real_config_errors(make, quoted):
    with pytest.raises(hf_vq.ConfigError) as e:
        make()
    assert quoted in str(e.value)
    assert f"`{quoted}`" in (DOCS / "troubleshooting.md").read_text().replace("\\|", "|")
