"""pyproject.toml: `pip install -e .` in a fresh virtual environment makes nanopairwise, kernels
and the training scripts importable from another directory; requirements*.txt agree with it;
no script edits sys.path."""

import glob
import os
import shutil
import re
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))


def requirement_lines(name) -> list:
    lines = [line.split("#")[0].strip() for line in open(os.path.join(ROOT, name), encoding="utf-8")]
    return [line for line in lines if line]


def test_requirements_agree_with_pyproject():
    assert requirement_lines("requirements.txt") == PYPROJECT["project"]["dependencies"] + ["-e ."]
    assert "torch==2.13.0" in PYPROJECT["project"]["dependencies"]  # exact: the measured version
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert sorted(requirement_lines("requirements-dev.txt")) == sorted(extras["dev"])
    assert {"dev", "gguf", "plot", "tracking", "parquet"} <= set(PYPROJECT["project"]["optional-dependencies"])


def test_scripts_do_not_edit_sys_path():
    scripts = glob.glob(os.path.join(ROOT, "scripts", "*.py")) + glob.glob(os.path.join(ROOT, "kernels", "*.py")) + [
        os.path.join(ROOT, "train_rm.py"), os.path.join(ROOT, "train_ppo.py")]
    offenders = [p for p in scripts if re.search(r"sys\.path\.(insert|append)", open(p, encoding="utf-8").read())]
    assert offenders == []


def site_packages_of_this_interpreter() -> list:
    """The site-packages directories the running interpreter imports from: a venv's own, the
    system's where that venv sees them (--system-site-packages), the user site; not the repository,
    not PYTHONPATH, not the entries that editable installs add through .pth files."""
    return [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]


def test_editable_install_in_a_fresh_venv_imports_from_anywhere(tmp_path):
    """`pip install --no-deps --no-build-isolation -e .` into a fresh venv (offline, a few seconds),
    then the imports from a directory that is not the repository.

    The venv sees exactly the packages of the interpreter running this test, whether that is the
    system's or the virtual environment the README's install made: it is made `--without-pip` and
    without system site-packages, and a `.pth` file in it lists this interpreter's site-packages
    directories (plain path lines: their own .pth files, such as this repository's editable install,
    are not run). So torch is not installed again, and pip and setuptools are the ones
    requirements-dev.txt installed (setuptools >= 70.1 builds the editable wheel without `wheel`;
    `venv --system-site-packages` from inside a venv would see the base interpreter's instead,
    which may be too old: "invalid command 'bdist_wheel'"). The repo installed is a copy of this
    one's package files and the venv's own site-packages comes first on its path, so the check holds
    where this repository is already installed (requirements.txt's `-e .`): the venv's own install
    must be the one imported."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=lambda d, names: [n for n in names if n in
                                                         (".git", "runs", "tests", "scripts", "docs", "__pycache__")
                                                         or n.endswith(".egg-info")])
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / ("Scripts" if os.name == "nt" else "bin") / "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], env=env,
                         capture_output=True, text=True, check=True, timeout=120).stdout.strip()
    with open(os.path.join(own, "zz_running_interpreter.pth"), "w", encoding="utf-8") as f:
        f.write("\n".join(site_packages_of_this_interpreter()) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import nanopairwise, kernels, train_rm, train_ppo, nanopairwise.formats; "
             "print(nanopairwise.__file__); print(kernels.__file__)")
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                              "--no-build-isolation", "-e", str(repo)], capture_output=True, text=True, timeout=300,
                             env=env)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    after = subprocess.run([python, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert after.returncode == 0, after.stderr[-2000:]
    paths = after.stdout.split()
    assert paths == [str(repo / "nanopairwise" / "__init__.py"), str(repo / "kernels" / "__init__.py")]
