"""Before the window opens: the system libraries Qt's X11 platform plugin needs, and what to install if any is missing.

On a clean Linux desktop Qt 6's xcb plugin fails to load without ``libxcb-cursor0`` (and, on minimal systems, a
few other X11 helper libraries); Qt then prints a long plugin message and aborts. This module finds what is
missing first (``ldd`` on the plugin, else loading each known library) and says, per distribution family, the
one command that installs it. No Qt import here: it runs before Qt is touched.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

# soname -> package (Debian/Ubuntu, Fedora/RHEL, Arch)
PACKAGES: dict[str, tuple[str, str, str]] = {
    "libxcb-cursor.so.0": ("libxcb-cursor0", "xcb-util-cursor", "xcb-util-cursor"),
    "libxkbcommon-x11.so.0": ("libxkbcommon-x11-0", "libxkbcommon-x11", "libxkbcommon-x11"),
    "libxkbcommon.so.0": ("libxkbcommon0", "libxkbcommon", "libxkbcommon"),
    "libxcb-icccm.so.4": ("libxcb-icccm4", "xcb-util-wm", "xcb-util-wm"),
    "libxcb-keysyms.so.1": ("libxcb-keysyms1", "xcb-util-keysyms", "xcb-util-keysyms"),
    "libxcb-image.so.0": ("libxcb-image0", "xcb-util-image", "xcb-util-image"),
    "libxcb-render-util.so.0": ("libxcb-render-util0", "xcb-util-renderutil", "xcb-util-renderutil"),
    "libxcb-shape.so.0": ("libxcb-shape0", "libxcb", "libxcb"),
    "libxcb-xinerama.so.0": ("libxcb-xinerama0", "libxcb", "libxcb"),
    "libxcb-xkb.so.1": ("libxcb-xkb1", "libxcb", "libxcb"),
    "libxcb-randr.so.0": ("libxcb-randr0", "libxcb", "libxcb"),
    "libxcb.so.1": ("libxcb1", "libxcb", "libxcb"),
    "libX11-xcb.so.1": ("libx11-xcb1", "libX11-xcb", "libx11"),
    "libEGL.so.1": ("libegl1", "libglvnd-egl", "libglvnd"),
    "libGL.so.1": ("libgl1", "libglvnd-glx", "libglvnd"),
    "libOpenGL.so.0": ("libopengl0", "libglvnd-opengl", "libglvnd"),
    "libfontconfig.so.1": ("libfontconfig1", "fontconfig", "fontconfig"),
    "libdbus-1.so.3": ("libdbus-1-3", "dbus-libs", "dbus"),
}
FAMILIES = ("debian", "fedora", "arch")
COMMANDS = {"debian": "sudo apt-get install -y", "fedora": "sudo dnf install -y", "arch": "sudo pacman -S --needed"}
NAMES = {"debian": "Debian/Ubuntu", "fedora": "Fedora/RHEL", "arch": "Arch"}


def uses_xcb(env: Optional[dict] = None, platform: str = sys.platform) -> bool:
    """Qt will pick its X11 plugin: Linux, no other platform asked for, and an X display (or no Wayland one)."""
    env = os.environ if env is None else env
    if not platform.startswith("linux"):
        return False
    asked = env.get("QT_QPA_PLATFORM", "")
    if asked:
        return asked.split(":")[0].split(";")[0] == "xcb"
    return bool(env.get("DISPLAY")) or not env.get("WAYLAND_DISPLAY")


def xcb_plugin() -> Optional[Path]:
    try:
        import PySide6
    except ImportError:
        return None
    plugin = Path(PySide6.__file__).parent / "Qt" / "plugins" / "platforms" / "libqxcb.so"
    return plugin if plugin.exists() else None


def parse_ldd(output: str) -> list[str]:
    """The sonames ``ldd`` reports as ``not found``."""
    return sorted({m.group(1) for m in re.finditer(r"^\s*(\S+)\s*=>\s*not found", output, re.M)})


def missing_libraries(plugin: Optional[Path] = None) -> list[str]:
    """Sonames the xcb plugin needs that the dynamic loader cannot find."""
    plugin = plugin or xcb_plugin()
    if plugin is not None and shutil.which("ldd"):
        try:
            out = subprocess.run(["ldd", str(plugin)], capture_output=True, text=True, timeout=20).stdout
            return parse_ldd(out)
        except (OSError, subprocess.SubprocessError):
            pass
    missing = []
    for soname in PACKAGES:  # no ldd: try each library Qt's xcb plugin is known to need
        try:
            ctypes.CDLL(soname)
        except OSError:
            missing.append(soname)
    return missing


def family(os_release: Optional[str] = None) -> Optional[str]:
    """debian, fedora or arch, from /etc/os-release (ID and ID_LIKE); None when it is none of them."""
    if os_release is None:
        try:
            os_release = Path("/etc/os-release").read_text()
        except OSError:
            return None
    ids = []
    for key in ("ID", "ID_LIKE"):
        m = re.search(rf'^{key}="?([^"\n]*)"?', os_release, re.M)
        if m:
            ids += m.group(1).split()
    for i in ids:
        if i in ("debian", "ubuntu"):
            return "debian"
        if i in ("fedora", "rhel", "centos"):
            return "fedora"
        if i in ("arch", "manjaro"):
            return "arch"
    return None


def advice(missing: list[str], fam: Optional[str]) -> str:
    """What to print: the missing libraries and the command that installs them (every family when unknown)."""
    lines = ["The studio's window cannot open: Qt's X11 platform plugin needs system libraries that are not "
             f"installed: {', '.join(missing)}.", ""]
    for f in ([fam] if fam else FAMILIES):
        pkgs = sorted({PACKAGES[s][FAMILIES.index(f)] for s in missing if s in PACKAGES})
        unknown = [s for s in missing if s not in PACKAGES]
        if pkgs:
            lines.append(f"  {NAMES[f]}:  {COMMANDS[f]} {' '.join(pkgs)}")
        if unknown and f == (fam or FAMILIES[-1]):
            lines.append(f"  (and the package that provides {', '.join(unknown)})")
    lines += ["", "Then run the studio again. Everything the studio does also works without a window: see `tsdpo --help`."]
    return "\n".join(lines)


def check() -> Optional[str]:
    """The message to print before exiting, or None when the window can open (or the check does not apply)."""
    if not uses_xcb():
        return None
    missing = missing_libraries()
    return advice(missing, family()) if missing else None
