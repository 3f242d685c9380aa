#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""
The host package as a user meets it: `make deb` (scripts/build-deb, which
fails on any lintian error or warning) writes
build/deb/qemu-system-x86-vmemmap_*.deb; the test installs it on this
machine with `apt-get install ./...deb`, checks its files (no file shared
with any other package, the firmware links resolve), runs the fork
(`--version`, `-L help`, a firmware boot to "No bootable device." with
SeaBIOS, SeaVGABIOS, the iPXE option ROM and kvmvapic.bin found through the
package's data directories), `vmem-limit --help` and `man` on its page,
then runs tests/guest/test_libvirt.py with the installed binaries
(VMTEST_QEMU=/usr/bin/qemu-system-x86_64-vmemmap,
VMTEST_VMEM_LIMIT=/usr/bin/vmem-limit), and the unit's test
tests/tools/test_vmem_limit_unit.py, whose ExecStart then runs the
installed /usr/bin/vmem-limit (the installed unit must equal
tools/vmem-limit/vmem-limit@.service).  Finally it purges the package,
with any dependency the install pulled in, and checks that nothing of it is
left and that Debian's own QEMU, its data and firmware packages are as they
were (dpkg --verify, file lists, versions).  The purge also runs when a
step fails or the test is stopped.

HOST_DEB=PATH tests that package instead of building one.  Both tests
run with VMTEST_VMEM_LIMIT_UNIT=/lib/systemd/system/vmem-limit@.service
in their environment, for a test that wants the installed unit's path.
"""

import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'guest'))
from vmtest import TOP, HarnessError, Tests, check, log, poll  # noqa: E402

PKG = 'qemu-system-x86-vmemmap'
QEMU = '/usr/bin/qemu-system-x86_64-vmemmap'
PRIV = f'/usr/lib/{PKG}'
TOOL = '/usr/bin/vmem-limit'
UNIT = '/lib/systemd/system/vmem-limit@.service'
DOC = f'/usr/share/doc/{PKG}'
# What the package must hold (beyond the firmware links, checked apart).
FILES = (QEMU, f'{PRIV}/bin/qemu-system-x86_64', f'{PRIV}/share/qemu',
         TOOL, UNIT, '/etc/default/vmem-limit',
         '/usr/share/man/man1/vmem-limit.1.gz',
         '/usr/share/man/man1/qemu-system-x86_64-vmemmap.1.gz',
         f'{DOC}/copyright', f'{DOC}/changelog.Debian.gz',
         f'{DOC}/README.Debian', f'{DOC}/user-guide.rst.gz',
         f'{DOC}/vmem-limit.rst.gz', f'{DOC}/protocol.rst.gz',
         f'{DOC}/examples/virtio-mem-vmemmap-domain.xml')
# Debian's packages the fork sits beside or uses: left as they were.
DEBIAN = ('qemu-system-x86', 'qemu-system-data', 'qemu-system-common',
          'seabios', 'ipxe-qemu')
APT = ['apt-get', '-y', '-q', '-o', 'DPkg::Lock::Timeout=600']
ENV = dict(os.environ, DEBIAN_FRONTEND='noninteractive')


def run(*cmd, check_=True, timeout=600, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env=kw.pop('env', ENV), **kw)
    if check_ and p.returncode:
        raise HarnessError(f'{" ".join(cmd)} exited {p.returncode}:\n'
                           f'{(p.stdout + p.stderr).strip()[-3000:]}')
    return p


def installed():
    """{package: version} of every installed package."""
    out = run('dpkg-query', '-W', '-f',
              '${db:Status-Status} ${Package} ${Version}\n').stdout
    return {f[1]: f[2] for f in (line.split() for line in out.splitlines())
            if len(f) == 3 and f[0] == 'installed'}


def debian_state():
    """What must not change: version, file list and dpkg --verify of each
    of Debian's packages that is installed."""
    have = installed()
    state = {}
    for p in DEBIAN:
        if p not in have:
            continue
        files = run('dpkg', '-L', p).stdout
        verify = run('dpkg', '--verify', p, check_=False).stdout
        state[p] = (have[p], files, verify)
    return state


def build_deb():
    if os.environ.get('HOST_DEB'):
        return os.path.abspath(os.environ['HOST_DEB'])
    t0 = time.monotonic()
    p = subprocess.run([os.path.join(TOP, 'scripts', 'build-deb')],
                       capture_output=True, text=True, timeout=3600)
    if p.returncode:
        raise HarnessError(f'scripts/build-deb exited {p.returncode}:\n'
                           f'{p.stderr[-4000:]}')
    deb = p.stdout.strip().splitlines()[-1]
    log(f'scripts/build-deb: {deb} ({time.monotonic() - t0:.0f}s)')
    for line in open(os.path.join(os.path.dirname(deb), f'{PKG}.lintian')):
        log(f'lintian: {line.rstrip()}')
    return deb


class Installed:
    """The package installed with apt, purged again on exit, with every
    package the install added."""

    def __init__(self, deb):
        self.deb = deb
        self.before = None
        self.added = []

    def __enter__(self):
        self.before = installed()
        if PKG in self.before:
            raise HarnessError(f'{PKG} {self.before[PKG]} is installed '
                               f'already; the test installs and purges it: '
                               f'run "apt-get purge {PKG}" first')
        return self

    def install(self):
        t0 = time.monotonic()
        run(*APT, 'install', self.deb)
        after = installed()
        self.added = sorted(set(after) - set(self.before) - {PKG})
        log(f'apt-get install {os.path.basename(self.deb)}: {PKG} '
            f'{after.get(PKG)} ({time.monotonic() - t0:.1f}s); '
            f'also installed: {self.added or "nothing"}')
        return after.get(PKG)

    def purge(self):
        t0 = time.monotonic()
        have = installed()
        # A half-installed package is not "installed" for dpkg-query's
        # status: purge it whatever state it is in.
        run(*APT, 'purge', PKG, *[p for p in self.added if p in have],
            check_=False)
        run('dpkg', '--purge', PKG, check_=False)
        log(f'apt-get purge {PKG} {" ".join(self.added)} '
            f'({time.monotonic() - t0:.1f}s)')

    def __exit__(self, *exc):
        self.purge()


def version_of(deb):
    return run('dpkg-deb', '-f', deb, 'Version').stdout.strip()


def files_present():
    missing = [f for f in FILES if not os.path.lexists(f)]
    check(not missing, f'missing after install: {missing}')
    check(os.path.islink(QEMU) and os.path.realpath(QEMU) ==
          f'{PRIV}/bin/qemu-system-x86_64',
          f'{QEMU} -> {os.path.realpath(QEMU)}')
    check(os.path.realpath(f'{PRIV}/share/qemu') == '/usr/share/qemu',
          f'{PRIV}/share/qemu -> {os.path.realpath(PRIV + "/share/qemu")}')
    fw = glob.glob(f'{PRIV}/share/qemu-firmware/*')
    dangling = [f for f in fw if not os.path.exists(f)]
    check(not dangling, f'firmware links that resolve to nothing: {dangling}')
    names = {os.path.basename(f) for f in fw}
    for need in ('bios-256k.bin', 'vgabios-stdvga.bin', 'efi-virtio.rom'):
        check(need in names, f'{need} not in {PRIV}/share/qemu-firmware')
    log(f'{len(FILES)} paths present, {len(fw)} firmware links resolve')


def package_files(deb):
    """Paths of the files and links in the package (not directories)."""
    out = run('dpkg-deb', '-c', deb).stdout
    return [line.split(None, 5)[5].split(' -> ')[0][1:]
            for line in out.splitlines() if line[0] in '-l']


def shares_no_file(deb):
    """No path of the package (nor its /usr alias on a merged-/usr system)
    belongs to another package; in particular none of Debian's QEMU."""
    ours = package_files(deb)
    check(ours and all(f.startswith('/') for f in ours), f'{ours}')
    queries = ours + ['/usr' + f for f in ours if f.startswith('/lib/')]
    out = run('dpkg-query', '-S', *queries, check_=False).stdout
    shared = [line for line in out.splitlines()
              if line.split(': ', 1)[0] != PKG]
    check(not shared, 'paths owned by other packages too:\n'
          + '\n'.join(shared))
    for p in ('qemu-system-x86', 'qemu-system-data'):
        if p in installed():
            theirs = set(run('dpkg', '-L', p).stdout.splitlines())
            both = sorted(f for f in set(ours) & theirs
                          if not os.path.isdir(f))
            check(not both, f'files shared with {p}: {both}')
    log(f'{len(ours)} files and links, none owned by another package')


def qemu_version():
    out = run(QEMU, '--version').stdout
    check(out.startswith('QEMU emulator version 10.0.'), out)
    log(out.splitlines()[0])


def data_dirs():
    dirs = run(QEMU, '-L', 'help').stdout.split()
    want = [f'{PRIV}/share/qemu-firmware', f'{PRIV}/share/qemu']
    check([os.path.realpath(d) for d in dirs] ==
          [os.path.realpath(d) for d in want],
          f'-L help: {dirs}, want {want}')
    log(f'-L help: {" ".join(dirs)}')


def firmware_boot():
    """A machine with a VGA and a virtio NIC boots SeaBIOS to its end:
    QEMU refuses to start if it cannot find a BIOS or an option ROM, and
    SeaBIOS's debug port shows each one running."""
    with tempfile.TemporaryDirectory(prefix='vmtest-deb-') as tmp:
        dbg = os.path.join(tmp, 'seabios.log')
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [QEMU, '-nodefaults', '-display', 'none', '-machine', 'q35',
             '-accel', 'tcg', '-m', '128M', '-serial', 'none',
             '-monitor', 'none', '-chardev', f'file,id=dbg,path={dbg}',
             '-device', 'isa-debugcon,iobase=0x402,chardev=dbg',
             '-device', 'VGA', '-device', 'virtio-net-pci'],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            def ended():
                if proc.poll() is not None:
                    raise HarnessError(f'QEMU exited {proc.returncode}: '
                                       f'{proc.stdout.read()}')
                with open(dbg, 'a+', errors='replace') as f:
                    f.seek(0)
                    text = f.read()
                return text if 'No bootable device.' in text else None
            text = poll(ended, 120, 'SeaBIOS to try every boot device')
        finally:
            proc.kill()
            proc.wait()
    for line in ('SeaBIOS (version', 'Start SeaVGABIOS',
                 'Searching bootorder for: /pci@i0cf8/*@2',
                 'Searching bootorder for: /rom@genroms/kvmvapic.bin',
                 'Booting from ROM...'):
        check(line in text, f'no "{line}" in SeaBIOS\'s log:\n{text[-2000:]}')
    banner = next(x for x in text.splitlines() if 'SeaBIOS (version' in x)
    log(f'{banner.strip()}, VGA BIOS, iPXE ROM and kvmvapic.bin found; '
        f'no bootable device after {time.monotonic() - t0:.1f}s')


def tool_help():
    out = run(TOOL, '--help').stdout
    for word in ('follow', 'resize', '--domain', '--qmp'):
        check(word in out, f'vmem-limit --help does not mention {word}')
    log(f'vmem-limit --help: {len(out.splitlines())} lines')


def man_page():
    page = run('man', '-w', 'vmem-limit').stdout.strip()
    check(page == '/usr/share/man/man1/vmem-limit.1.gz',
          f'man -w vmem-limit: {page}')
    env = dict(ENV, MANWIDTH='80')
    env.pop('MAN_KEEP_FORMATTING', None)
    p = run('man', '-l', page, env=env)
    check('warning' not in p.stderr, f'man: {p.stderr}')
    text = p.stdout
    for want in ('VMEM-LIMIT(1)', 'NAME', 'SYNOPSIS', 'vmem-limit --qmp'):
        check(want in text, f'man -l {page} lacks "{want}"')
    q = run('man', '-l',
            '/usr/share/man/man1/qemu-system-x86_64-vmemmap.1.gz', env=env)
    check('QEMU-SYSTEM-X86_64-VMEMMAP(1)' in q.stdout, q.stdout[:500])
    log(f'man -l {page}: {len(text.splitlines())} lines; '
        f'{text.splitlines()[0].strip()}')


def run_test(path, env):
    """Run another test file of the project, its TAP indented; returns
    its exit status and output.  Stopped early, it is stopped too (the
    guest tests stop their domains and daemons on SIGTERM) before the
    package goes."""
    p = subprocess.Popen([sys.executable, path], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    out = []
    try:
        for line in p.stdout:
            out.append(line)
            print(f'    {line.rstrip()}', flush=True)
        st = p.wait()
    finally:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return st, ''.join(out)


# The installed binaries, and the installed unit for a test of the unit.
TEST_ENV = dict(os.environ, VMTEST_QEMU=QEMU, VMTEST_VMEM_LIMIT=TOOL,
                VMTEST_VMEM_LIMIT_UNIT=UNIT)


def libvirt_end_to_end():
    t0 = time.monotonic()
    st, _ = run_test(os.path.join(TOP, 'tests', 'guest', 'test_libvirt.py'),
                     TEST_ENV)
    check(st == 0, f'tests/guest/test_libvirt.py with {QEMU} exited {st}')
    log(f'libvirt end-to-end with the package: passed '
        f'({time.monotonic() - t0:.0f}s)')


def unit_end_to_end():
    """The unit's own test, with the package installed: the unit's
    ExecStart runs /usr/bin/vmem-limit from the package."""
    src = os.path.join(TOP, 'tools', 'vmem-limit', 'vmem-limit@.service')
    with open(UNIT) as a, open(src) as b:
        check(a.read() == b.read(), f'{UNIT} differs from {src}: the '
              'package is older than the checkout; run "make deb"')
    t0 = time.monotonic()
    st, out = run_test(os.path.join(TOP, 'tests', 'tools',
                                    'test_vmem_limit_unit.py'), TEST_ENV)
    check(st == 0, f'tests/tools/test_vmem_limit_unit.py exited {st}')
    check(f'ExecStart: {TOOL} ' in out and 'is not installed' not in out,
          f'the unit did not run the installed {TOOL}')
    log(f'the unit with the package: passed ({time.monotonic() - t0:.0f}s)')


def purged(before_debian):
    have = installed()
    check(PKG not in have, f'{PKG} still installed')
    st = run('dpkg', '-L', PKG, check_=False)
    check(st.returncode != 0, f'dpkg -L {PKG} still lists:\n{st.stdout}')
    left = [f for f in FILES + (PRIV, DOC) if os.path.lexists(f)]
    check(not left, f'left after purge: {left}')
    check(debian_state() == before_debian,
          "Debian's QEMU packages changed (version, file list or "
          "dpkg --verify)")
    log(f'purged; {", ".join(sorted(before_debian))}: versions, file lists '
        f'and dpkg --verify as before')


def main():
    # A stopped test purges what it installed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t = Tests()
    built = []
    given = os.environ.get('HOST_DEB')
    t.case(f'HOST_DEB={given} exists' if given else
           'scripts/build-deb: a lintian-clean package',
           lambda: built.append(build_deb()) or
           check(os.path.isfile(built[0]), f'{built[0]} missing'))
    if not built or not os.path.isfile(built[0]):
        t.done()
    deb = built[0]
    before_debian = debian_state()
    with Installed(deb) as inst:
        t.case(f'apt-get install ./{os.path.relpath(deb, TOP)}',
               lambda: check(inst.install() == version_of(deb),
                             f'{PKG} not installed at {version_of(deb)}'))
        t.case('files in place, firmware links resolve', files_present)
        t.case('no file shared with another package (Debian\'s QEMU '
               'included)', lambda: shares_no_file(deb))
        t.case(f'{QEMU} --version', qemu_version)
        t.case('data and firmware directories: the package\'s share/',
               data_dirs)
        t.case('firmware boot finds SeaBIOS, VGA BIOS, iPXE ROM',
               firmware_boot)
        t.case('vmem-limit --help', tool_help)
        t.case('man vmem-limit renders', man_page)
        t.case('libvirt end-to-end test with the installed emulator and '
               'vmem-limit', libvirt_end_to_end)
        t.case('the unit\'s test (tests/tools/test_vmem_limit_unit.py) '
               'with the installed unit and vmem-limit', unit_end_to_end)
    t.case("purge leaves nothing; Debian's QEMU untouched",
           lambda: purged(before_debian))
    t.done()


if __name__ == '__main__':
    main()
