"""Only here to put autoflash.pth and autoflash.start at the root of site-packages.

setup.cfg holds all metadata. setuptools has no declarative way to install a file
next to the packages rather than inside one (``data_files`` lands in the prefix), so
both build paths are taught to copy the two start-up files:

- ``build_py`` for regular installs and wheels: the wheel's root is site-packages;
- ``editable_wheel`` for ``pip install -e``: its wheel holds no package files, only
  path hooks, so the start-up files are added to it directly.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

STARTUP_FILES = ("autoflash.pth", "autoflash.start")
HERE = Path(__file__).resolve().parent


def _copy_startup_files(target_dir):
    for name in STARTUP_FILES:
        shutil.copyfile(HERE / name, Path(target_dir) / name)


class BuildPyWithStartupFiles(build_py):
    def run(self):
        super().run()
        _copy_startup_files(self.build_lib)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        return outputs + [str(Path(self.build_lib) / name) for name in STARTUP_FILES]


class EditableWheelWithStartupFiles(editable_wheel):
    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        _copy_startup_files(unpacked_wheel)
        return result


setup(cmdclass={"build_py": BuildPyWithStartupFiles, "editable_wheel": EditableWheelWithStartupFiles})
