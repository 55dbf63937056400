"""A missing system library for Qt's window is said before Qt is touched, with the command that installs it."""

import pytest

from studio import app, system_libs

LDD = """\tlinux-vdso.so.1 (0x00007ffd)
\tlibQt6XcbQpa.so.6 => /x/PySide6/Qt/lib/libQt6XcbQpa.so.6 (0x00007f)
\tlibxcb-cursor.so.0 => not found
\tlibxcb-icccm.so.4 => /lib/x86_64-linux-gnu/libxcb-icccm.so.4 (0x00007f)
\tlibxkbcommon-x11.so.0 => not found
"""


def test_ldd_output_gives_the_missing_libraries():
    assert system_libs.parse_ldd(LDD) == ["libxcb-cursor.so.0", "libxkbcommon-x11.so.0"]
    assert system_libs.parse_ldd(LDD.replace("not found", "/lib/x.so (0x1)")) == []


@pytest.mark.parametrize("release, fam, command", [
    ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n', "debian", "sudo apt-get install -y libxcb-cursor0"),
    ('NAME="Ubuntu"\nID=ubuntu\nID_LIKE=debian\n', "debian", "sudo apt-get install -y libxcb-cursor0"),
    ('NAME="Linux Mint"\nID=linuxmint\nID_LIKE="ubuntu debian"\n', "debian", "apt-get install -y libxcb-cursor0"),
    ('NAME="Fedora Linux"\nID=fedora\n', "fedora", "sudo dnf install -y xcb-util-cursor"),
    ('NAME="Rocky Linux"\nID="rocky"\nID_LIKE="rhel centos fedora"\n', "fedora", "dnf install -y xcb-util-cursor"),
    ('NAME="Arch Linux"\nID=arch\n', "arch", "sudo pacman -S --needed xcb-util-cursor"),
])
def test_the_advice_names_the_package_for_the_distribution(release, fam, command):
    assert system_libs.family(release) == fam
    text = system_libs.advice(["libxcb-cursor.so.0"], fam)
    assert "libxcb-cursor.so.0" in text and command in text
    assert text.count("sudo ") == 1  # only this family's command


def test_an_unknown_distribution_gets_every_familys_command():
    assert system_libs.family('ID=gentoo\n') is None
    text = system_libs.advice(["libxcb-cursor.so.0", "libweird.so.3"], None)
    assert "apt-get install -y libxcb-cursor0" in text and "dnf install -y xcb-util-cursor" in text
    assert "pacman -S --needed xcb-util-cursor" in text and "libweird.so.3" in text


def test_the_check_applies_to_the_x11_plugin_only():
    assert system_libs.uses_xcb({"DISPLAY": ":0"}, "linux")
    assert system_libs.uses_xcb({"QT_QPA_PLATFORM": "xcb"}, "linux")
    assert not system_libs.uses_xcb({"QT_QPA_PLATFORM": "offscreen", "DISPLAY": ":0"}, "linux")
    assert not system_libs.uses_xcb({"WAYLAND_DISPLAY": "wayland-0"}, "linux")
    assert not system_libs.uses_xcb({"DISPLAY": ":0"}, "darwin")


def test_the_plugin_on_this_machine_finds_what_it_needs():
    plugin = system_libs.xcb_plugin()
    assert plugin is not None and plugin.name == "libqxcb.so"
    assert system_libs.missing_libraries(plugin) == []  # CI's machine has them; so does the README's setup


def test_the_studio_says_what_to_install_and_exits_before_qt(monkeypatch, capsys):
    import sys

    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    monkeypatch.setattr(system_libs, "missing_libraries", lambda plugin=None: ["libxcb-cursor.so.0"])
    monkeypatch.setattr(system_libs, "family", lambda os_release=None: "debian")
    had_widgets = "PySide6.QtWidgets" in sys.modules
    assert app.main([]) == 2
    err = capsys.readouterr().err
    assert "libxcb-cursor.so.0" in err and "sudo apt-get install -y libxcb-cursor0" in err and "tsdpo --help" in err
    assert had_widgets or "PySide6.QtWidgets" not in sys.modules  # Qt was not started
