"""CI never hides a missing component: a test that needs root or a program it does not find skips on a
developer's machine, and fails under CI=true (conftest.py's `lacking`), where scripts/test has installed
everything and a skip could only mean a broken setup."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]


def test_a_missing_program_skips_here_and_fails_under_ci(pytester, monkeypatch):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    requires(command): a program the test runs\n")
    pytester.makepyfile(test_needs='''
import pytest

@pytest.mark.requires("hearth-no-such-program")
def test_marked():
    pass

def test_through_a_fixture(request):
    from conftest import lacking
    lacking("the component this fixture starts is not installed")
''')
    monkeypatch.delenv("CI", raising=False)
    here = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    here.assert_outcomes(skipped=2)
    here.stdout.fnmatch_lines(["*hearth-no-such-program is not installed (scripts/test installs it)*"])
    monkeypatch.setenv("CI", "true")
    ci = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    ci.assert_outcomes(failed=1, errors=1)  # the mark fails the test's setup, the fixture the test
    ci.stdout.fnmatch_lines(["*CI=true: this must not be skipped*"])
