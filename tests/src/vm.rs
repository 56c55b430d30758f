//! A QEMU guest running one of Debian's kernels (BPF LSM active) with a busybox initramfs.
//!
//! The harness packs busybox, the binaries a test names (with the shared libraries `ldd` lists),
//! the kernel modules it needs (with their dependencies, decompressed), users and a scenario
//! script into an initramfs, boots it under software emulation, and returns the guest's
//! console. Scenario scripts print result lines `@@R <key> <value...>`, which
//! [`GuestRun::results`] collects.
//!
//! The kernels live under [`vm_dir`] (scripts/setup.sh puts them there): `6.1`, `6.12` and
//! `sid` (Debian unstable's newest). [`kernels`] lists the ones a test run covers.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// Modules every guest loads: the PCI transport and the network card. Each is skipped where
/// the kernel has it built in.
const BASE_MODULES: [&str; 2] = ["virtio_pci", "virtio_net"];

/// The kernel series a full run covers, in order.
pub const ALL_KERNELS: [&str; 3] = ["6.1", "6.12", "sid"];

/// Serialises guests: one emulated guest at a time keeps the 2-core machine's timings honest.
static BOOT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The same across processes (test binaries of several checkouts running at once): an flock on
/// a file in the temporary directory, held while a guest runs.
struct MachineLock {
    _file: std::fs::File,
}

impl MachineLock {
    fn take() -> Result<Self> {
        use std::os::fd::AsRawFd;
        let path = std::env::temp_dir().join("airlock-guest.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; released when the file is closed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!(
                "flock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Self { _file: file })
    }
}

/// Shell function for guest scripts: `start_agent` starts `airlock-agent` with
/// /etc/airlock/agent.toml (log in /tmp/agent-N.log, pid in `$AGENT`), waits until it has
/// loaded its rules and is connected to its decider, and reports `@@R agent_N 1` (0 if it
/// never got there).
pub const START_AGENT: &str = r#"
n=0
start_agent() {
  n=$((n+1))
  /usr/bin/airlock-agent --config /etc/airlock/agent.toml > /tmp/agent-$n.log 2>&1 &
  AGENT=$!
  for i in $(seq 1 300); do
    grep -q "airlock-agent running" /tmp/agent-$n.log && grep -q "connected to decider" /tmp/agent-$n.log && break
    sleep 0.2
  done
  if grep -q 'airlock-agent running' /tmp/agent-$n.log && grep -q 'connected to decider' /tmp/agent-$n.log; then
    echo "@@R agent_$n 1"
  else
    echo "@@R agent_$n 0"
    tail -n 40 /tmp/agent-$n.log | sed "s|^|@@LOG start-failed |"
  fi
}
"#;

/// The kernels this run covers: `AIRLOCK_KERNELS` (comma-separated, e.g. `6.1,sid`), else all
/// of [`ALL_KERNELS`].
pub fn kernels() -> Vec<String> {
    match std::env::var("AIRLOCK_KERNELS") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
            .collect(),
        _ => ALL_KERNELS.iter().map(|k| (*k).to_owned()).collect(),
    }
}

/// Boots of one guest when its kernel panics before /init prints anything (see
/// [`Guest::boot`]).
pub const BOOT_ATTEMPTS: u32 = 3;

/// Whether a guest's `console` shows its kernel panicking before /init printed anything (all
/// of /init's lines start with `@@`).
fn panicked_before_init(console: &str) -> bool {
    console.contains("Kernel panic") && !console.contains("@@")
}

/// How QEMU runs the guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation: works on any machine, this project's included.
    Tcg,
    /// Hardware virtualisation through `/dev/kvm` with the host's CPU model. Needs a host
    /// whose KVM runs stock kernels (not `kvm_pvm`, which runs only PVM-built guests).
    Kvm,
}

impl Accel {
    /// `AIRLOCK_QEMU_ACCEL`: `tcg` (the default) or `kvm`.
    pub fn from_env() -> Result<Accel> {
        match std::env::var("AIRLOCK_QEMU_ACCEL").as_deref() {
            Err(_) | Ok("") | Ok("tcg") => Ok(Accel::Tcg),
            Ok("kvm") => Ok(Accel::Kvm),
            Ok(other) => bail!("AIRLOCK_QEMU_ACCEL={other:?}: expected `tcg` or `kvm`"),
        }
    }

    fn qemu_args(self) -> &'static [&'static str] {
        match self {
            Accel::Tcg => &["-accel", "tcg"],
            Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
        }
    }

    /// How the bench report names it.
    pub fn describe(self) -> &'static str {
        match self {
            Accel::Tcg => "QEMU TCG (software emulation",
            Accel::Kvm => "QEMU with KVM (hardware virtualisation",
        }
    }
}

/// Whether `kernel` is one this run covers (see [`kernels`]).
pub fn covers(kernel: &str) -> bool {
    kernels().iter().any(|k| k == kernel)
}

/// An unpacked kernel package: its image and its modules directory.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// Series name (`6.1`, `6.12`, `sid`).
    pub name: String,
    /// Release (`uname -r`), e.g. `6.12.117+deb12-amd64`.
    pub release: String,
    /// The compressed kernel image.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` (or `usr/lib/modules/<release>`), with modules.dep.
    pub modules: PathBuf,
}

impl Kernel {
    /// Finds the unpacked kernel `name` under [`vm_dir`].
    pub fn find(name: &str) -> Result<Self> {
        let dir = vm_dir().join(name);
        let release = std::fs::read_to_string(dir.join("ready"))
            .with_context(|| {
                format!(
                    "no guest kernel {name} under {}; run scripts/setup.sh",
                    vm_dir().display()
                )
            })?
            .trim()
            .to_owned();
        let root = dir.join("root");
        let modules = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|m| root.join(m).join(&release))
            .find(|p| p.join("modules.dep").exists())
            .with_context(|| format!("kernel {name}: no modules.dep; run scripts/setup.sh"))?;
        // 6.x: boot/vmlinuz-<release>; 7.x: usr/lib/modules/<release>/vmlinuz.
        let vmlinuz = [
            root.join("boot").join(format!("vmlinuz-{release}")),
            root.join("usr/lib/modules").join(&release).join("vmlinuz"),
        ]
        .into_iter()
        .find(|p| p.exists())
        .with_context(|| format!("kernel {name}: no vmlinuz for {release}"))?;
        Ok(Self {
            name: name.to_owned(),
            release,
            vmlinuz,
            modules,
        })
    }

    /// The module files to load for `names` (dependencies and `pre:` soft dependencies first,
    /// each once), skipping the ones built into the kernel. Names use `_` or `-`
    /// interchangeably, as modprobe does; soft dependencies may be aliases (`crypto-crc32c`),
    /// resolved through modules.alias, preferring the portable `*_generic` implementation.
    pub fn module_files(&self, names: &[&str]) -> Result<Vec<PathBuf>> {
        let read = |f: &str| std::fs::read_to_string(self.modules.join(f)).unwrap_or_default();
        let dep = read("modules.dep");
        if dep.is_empty() {
            bail!(
                "kernel {}: empty modules.dep; run scripts/setup.sh",
                self.name
            );
        }
        let table = ModuleTable::parse(&dep, &read("modules.softdep"), &read("modules.alias"));
        let builtin = read("modules.builtin");
        let mut order: Vec<String> = Vec::new();
        for n in names {
            let n = module_stem(n);
            if table.deps.contains_key(&n) {
                table.visit(&n, &mut order);
            } else if !builtin.lines().any(|l| module_stem(l) == n) {
                bail!(
                    "kernel {}: no module {n} (and it is not built in)",
                    self.name
                );
            }
        }
        Ok(order.into_iter().map(|p| self.modules.join(p)).collect())
    }
}

/// A module's name from its path or name: `kernel/fs/btrfs/btrfs.ko.xz` and `btrfs` are both
/// `btrfs`; dashes become underscores.
fn module_stem(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// What modules.dep, modules.softdep and modules.alias say, by module name.
struct ModuleTable {
    /// Module name to (path, paths of the modules it needs).
    deps: BTreeMap<String, (String, Vec<String>)>,
    /// Module name to the names or aliases it wants loaded before it.
    pre: BTreeMap<String, Vec<String>>,
    /// Alias to the module names that provide it.
    aliases: BTreeMap<String, Vec<String>>,
}

impl ModuleTable {
    fn parse(dep: &str, softdep: &str, alias: &str) -> Self {
        let deps = dep
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(m, d)| {
                let needs = d.split_whitespace().map(str::to_owned).collect();
                (module_stem(m), (m.to_owned(), needs))
            })
            .collect();
        let mut pre: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in softdep.lines() {
            let mut words = line.split_whitespace();
            let (Some("softdep"), Some(module)) = (words.next(), words.next()) else {
                continue;
            };
            let mut in_pre = false;
            for w in words {
                match w {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    name if in_pre => pre
                        .entry(module_stem(module))
                        .or_default()
                        .push(name.to_owned()),
                    _ => {}
                }
            }
        }
        let mut aliases: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in alias.lines() {
            let mut words = line.split_whitespace();
            if let (Some("alias"), Some(a), Some(m)) = (words.next(), words.next(), words.next()) {
                aliases
                    .entry(a.to_owned())
                    .or_default()
                    .push(module_stem(m));
            }
        }
        Self { deps, pre, aliases }
    }

    /// The module a soft dependency names: itself, or the module behind an alias.
    fn resolve(&self, name: &str) -> Option<String> {
        let stem = module_stem(name);
        if self.deps.contains_key(&stem) {
            return Some(stem);
        }
        let candidates = self.aliases.get(name)?;
        candidates
            .iter()
            .find(|m| m.ends_with("_generic"))
            .or_else(|| candidates.first())
            .cloned()
    }

    /// Appends `name` and what it needs to `order`, needs first.
    fn visit(&self, name: &str, order: &mut Vec<String>) {
        let Some((path, needs)) = self.deps.get(name) else {
            return;
        };
        if order.contains(path) {
            return;
        }
        for soft in self.pre.get(name).into_iter().flatten() {
            if let Some(m) = self.resolve(soft) {
                self.visit(&m, order);
            }
        }
        for d in needs {
            self.visit(&module_stem(d), order);
        }
        if !order.contains(path) {
            order.push(path.clone());
        }
    }
}

/// Where the unpacked kernel packages live (scripts/setup.sh puts them there).
pub fn vm_dir() -> PathBuf {
    std::env::var_os("AIRLOCK_VM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/vm"))
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// One file to put in the guest.
#[derive(Debug, Clone)]
enum Source {
    Host(PathBuf),
    Text(String),
}

/// A guest to boot: files, accounts and the scenario script run by /init.
#[derive(Debug, Default)]
pub struct Guest {
    files: Vec<(String, Source, u32)>,
    links: Vec<(String, String, bool)>,
    script: String,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// Echo console lines to stdout with this prefix as they arrive (for the demo).
    pub echo_prefix: Option<String>,
    /// Kernel series to boot (see [`kernels`]); default `6.1`.
    pub kernel: String,
    /// Extra kernel modules to load at start (with their dependencies).
    modules: Vec<String>,
    /// Raw disk images attached as virtio disks (`/dev/vda`, `/dev/vdb`, ...).
    disks: Vec<PathBuf>,
}

/// What a guest run printed.
#[derive(Debug)]
pub struct GuestRun {
    /// The whole console output.
    pub console: String,
    /// Wall time from QEMU start to power-off.
    pub elapsed: Duration,
}

impl GuestRun {
    /// Result lines `@@R key value...` as key to value (the last one wins).
    pub fn results(&self) -> BTreeMap<String, String> {
        self.console
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').split_once("@@R "))
            .map(|(_, rest)| {
                let (k, v) = rest.split_once(' ').unwrap_or((rest, ""));
                (k.to_owned(), v.trim().to_owned())
            })
            .collect()
    }

    /// Whether the script ran to its end.
    pub fn finished(&self) -> bool {
        self.console.contains("@@END")
    }
}

impl Guest {
    /// An empty guest with 1 GiB of memory on the 6.1 kernel.
    pub fn new() -> Self {
        Self {
            memory_mb: 1024,
            kernel: "6.1".into(),
            ..Default::default()
        }
    }

    /// An empty guest on the kernel series `kernel`.
    pub fn on(kernel: &str) -> Self {
        Self {
            kernel: kernel.to_owned(),
            ..Self::new()
        }
    }

    /// Loads the kernel module `name` (and what it depends on) at start, unless built in.
    pub fn module(&mut self, name: &str) -> &mut Self {
        self.modules.push(name.to_owned());
        self
    }

    /// Attaches the raw image `path` as the next virtio disk (`/dev/vda` first).
    pub fn disk(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.disks.push(path.into());
        self
    }

    /// Copies a host file to `guest_path` with `mode` (e.g. 0o755, 0o4755 for setuid root).
    pub fn file(&mut self, guest_path: &str, host: impl Into<PathBuf>, mode: u32) -> &mut Self {
        self.files
            .push((guest_path.into(), Source::Host(host.into()), mode));
        self
    }

    /// Writes `text` to `guest_path`.
    pub fn text(&mut self, guest_path: &str, text: impl Into<String>, mode: u32) -> &mut Self {
        self.files
            .push((guest_path.into(), Source::Text(text.into()), mode));
        self
    }

    /// A symbolic link at `guest_path` pointing to `target`.
    pub fn symlink(&mut self, guest_path: &str, target: &str) -> &mut Self {
        self.links.push((guest_path.into(), target.into(), false));
        self
    }

    /// A hard link at `guest_path` to the guest file `target`.
    pub fn hardlink(&mut self, guest_path: &str, target: &str) -> &mut Self {
        self.links.push((guest_path.into(), target.into(), true));
        self
    }

    /// The agent where its package puts it (`/usr/bin/airlock-agent`, configured by
    /// `/etc/airlock/agent.toml`, which holds `agent_config`), and the guest workload program
    /// `workload`, also as `/usr/local/bin/kubectl`, the binary the tests' rules name. The
    /// script starts the agent with [`START_AGENT`]. `AIRLOCK_AGENT_BIN` puts another build
    /// there (an older agent, to show an attack getting through before its defence).
    pub fn airlock(
        &mut self,
        workload: impl Into<PathBuf>,
        agent_config: impl Into<String>,
    ) -> Result<&mut Self> {
        let workload = workload.into();
        let agent = match std::env::var_os("AIRLOCK_AGENT_BIN") {
            Some(bin) => PathBuf::from(bin),
            None => crate::workspace_bin("agent-user", "airlock-agent")?,
        };
        Ok(self
            .file("/usr/bin/airlock-agent", agent, 0o755)
            .file("/usr/bin/airlock-workload", &workload, 0o755)
            .file("/usr/local/bin/kubectl", workload, 0o755)
            .text("/etc/airlock/agent.toml", agent_config, 0o644))
    }

    /// The scenario script, run by /init after the guest is set up, as root.
    pub fn script(&mut self, script: impl Into<String>) -> &mut Self {
        self.script = script.into();
        self
    }

    /// Builds the initramfs and boots it; returns when the guest powers off or `limit` passes.
    /// With `AIRLOCK_VM_VERBOSE` set, console lines are echoed to stderr as they arrive.
    ///
    /// A guest kernel that panics before /init prints anything is booted again (up to
    /// [`BOOT_ATTEMPTS`] times in all): under emulation with two vCPUs, Debian's kernels now
    /// and then take an int3 oops while patching their own code at start-up (seen on 7.2 in
    /// `set_next_task_fair`). Nothing of this project has run by then, so such a boot says
    /// nothing about it; a panic after /init has started is a failure like any other.
    pub fn boot(&self, limit: Duration) -> Result<GuestRun> {
        let kernel = Kernel::find(&self.kernel)?;
        let work = tempfile::tempdir()?;
        let initrd = work.path().join("initrd.cpio.gz");
        self.pack(&kernel, &work.path().join("root"), &initrd)?;
        let mut attempt = 1;
        loop {
            let run = self.boot_once(&kernel, &initrd, limit);
            let console = match &run {
                Ok(r) if !r.finished() => r.console.clone(),
                Ok(_) => return run,
                Err(e) => e.to_string(),
            };
            if !panicked_before_init(&console) || attempt == BOOT_ATTEMPTS {
                return run;
            }
            eprintln!(
                "warning: kernel {} panicked before /init ran (attempt {attempt} of \
                 {BOOT_ATTEMPTS}); booting again. Its console:\n{console}",
                self.kernel
            );
            attempt += 1;
        }
    }

    fn boot_once(&self, kernel: &Kernel, initrd: &Path, limit: Duration) -> Result<GuestRun> {
        let _one_at_a_time = BOOT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let _one_on_this_machine = MachineLock::take()?;
        let start = Instant::now();
        let mut qemu = Command::new("qemu-system-x86_64");
        for disk in &self.disks {
            qemu.arg("-drive")
                .arg(format!("file={},if=virtio,format=raw", disk.display()));
        }
        let mut child = qemu
            .args(Accel::from_env()?.qemu_args())
            .args(["-smp", "2", "-nographic", "-no-reboot"])
            .args(["-name", "airlock-guest"])
            .args(["-m", &self.memory_mb.to_string()])
            .arg("-kernel")
            .arg(&kernel.vmlinuz)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3"])
            .args([
                "-netdev",
                "user,id=n0",
                "-device",
                "virtio-net-pci,netdev=n0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting qemu-system-x86_64 (run scripts/setup.sh)")?;
        let stdout = child.stdout.take().context("qemu stdout")?;
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut console = String::new();
        let verbose = std::env::var_os("AIRLOCK_VM_VERBOSE").is_some();
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    if verbose {
                        eprintln!("guest| {line}");
                    }
                    if let Some(prefix) = &self.echo_prefix {
                        println!("{prefix}{}", line.trim_end_matches('\r'));
                    }
                    console.push_str(line.trim_end_matches('\r'));
                    console.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                let _ = reader.join();
                bail!("guest did not finish within {limit:?}; console so far:\n{console}");
            }
        }
        let status = child.wait()?;
        let _ = reader.join();
        if !status.success() && !console.contains("@@END") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            bail!("qemu exited with {status}: {err}\nconsole:\n{console}");
        }
        Ok(GuestRun {
            console,
            elapsed: start.elapsed(),
        })
    }

    fn pack(&self, kernel: &Kernel, root: &Path, out: &Path) -> Result<()> {
        for d in [
            "bin",
            "sbin",
            "etc",
            "proc",
            "sys",
            "dev",
            "tmp",
            "lib/modules",
            "usr/bin",
            "usr/local/bin",
            "opt",
            "root",
            "home/agent",
            "run",
        ] {
            std::fs::create_dir_all(root.join(d))?;
        }
        let busybox =
            which("busybox").context("busybox not found (apt-get install busybox-static)")?;
        copy(&busybox, &root.join("bin/busybox"), 0o755)?;
        let mut wanted: Vec<&str> = BASE_MODULES.to_vec();
        wanted.extend(self.modules.iter().map(String::as_str));
        for (i, m) in kernel.module_files(&wanted)?.iter().enumerate() {
            copy_module(m, &root.join(format!("lib/modules/{i:03}.ko")))?;
        }
        let passwd = "root:x:0:0:root:/root:/bin/sh\nagent:x:1000:1000:AI agent:/home/agent:/bin/sh\nother:x:1001:1001:other:/tmp:/bin/sh\n";
        std::fs::write(root.join("etc/passwd"), passwd)?;
        std::fs::write(
            root.join("etc/group"),
            "root:x:0:\nagent:x:1000:\nother:x:1001:\nai:x:1002:other\n",
        )?;
        std::fs::write(
            root.join("etc/shadow"),
            "root::1::::::\nagent:!:1::::::\nother:!:1::::::\n",
        )?;
        std::fs::set_permissions(
            root.join("etc/shadow"),
            std::fs::Permissions::from_mode(0o600),
        )?;
        std::fs::write(
            root.join("etc/machine-id"),
            "airlock0test0guest0000000000000\n",
        )?;
        std::os::unix::fs::chown(root.join("home/agent"), Some(1000), Some(1000))?;

        for (guest, src, mode) in &self.files {
            let dst = root.join(guest.trim_start_matches('/'));
            match src {
                Source::Host(p) => {
                    copy(p, &dst, *mode)?;
                    if is_dynamic(p) {
                        for lib in ldd(p)? {
                            let target = root.join(lib.to_string_lossy().trim_start_matches('/'));
                            if !target.exists() {
                                copy(&lib, &target, 0o755)?;
                            }
                        }
                    }
                }
                Source::Text(t) => {
                    if let Some(parent) = dst.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::write(&dst, t)?;
                    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(*mode))?;
                }
            }
        }
        for (guest, target, hard) in &self.links {
            let dst = root.join(guest.trim_start_matches('/'));
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent)?;
            }
            if *hard {
                std::fs::hard_link(root.join(target.trim_start_matches('/')), &dst)?;
            } else {
                std::os::unix::fs::symlink(target, &dst)?;
            }
        }
        let init = format!(
            "{INIT_HEAD}\n# --- scenario ---\n{}\n{INIT_TAIL}",
            self.script
        );
        std::fs::write(root.join("init"), init)?;
        std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o755))?;

        let cpio = Command::new("sh")
            .arg("-c")
            .arg("find . -print0 | cpio --null -o -H newc --quiet | gzip -1")
            .current_dir(root)
            .output()
            .context("running cpio (apt-get install cpio)")?;
        if !cpio.status.success() {
            bail!("cpio failed: {}", String::from_utf8_lossy(&cpio.stderr));
        }
        std::fs::File::create(out)?.write_all(&cpio.stdout)?;
        Ok(())
    }
}

const INIT_HEAD: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/local/bin:/usr/bin:/bin:/sbin
hostname airlock-guest
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
chmod 1777 /tmp
mount -t securityfs none /sys/kernel/security
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 none /sys/fs/cgroup
for m in /lib/modules/*.ko; do insmod "$m"; done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
# Let the guards, not Yama, decide who may ptrace a held task.
echo 0 > /proc/sys/kernel/yama/ptrace_scope 2>/dev/null
echo "@@R lsm $(cat /sys/kernel/security/lsm)"
"#;

const INIT_TAIL: &str = r#"
echo "@@R stopped_tasks_at_end $(grep -l ') T ' /proc/[0-9]*/stat 2>/dev/null | wc -l)"
echo "@@END"
sync
poweroff -f
"#;

/// Copies a kernel module, decompressing `.ko.xz` and `.ko.zst` (busybox insmod takes plain
/// `.ko` files only).
fn copy_module(src: &Path, dst: &Path) -> Result<()> {
    let name = src.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    let Some(tool) = tool else {
        return copy(src, dst, 0o644);
    };
    let out = Command::new(tool)
        .args(["-dc"])
        .arg(src)
        .output()
        .with_context(|| format!("running {tool} (apt-get install xz-utils zstd)"))?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(dst, out.stdout)?;
    Ok(())
}

fn copy(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(src, dst).with_context(|| format!("copying {} to the guest", src.display()))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn is_dynamic(p: &Path) -> bool {
    std::fs::read(p)
        .is_ok_and(|b| b.starts_with(b"\x7fELF") && b.windows(8).any(|w| w == b"ld-linux"))
}

/// Shared libraries of `bin`, as absolute paths (the loader included).
fn ldd(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::panicked_before_init;

    #[test]
    fn only_a_panic_before_init_counts_as_an_early_panic() {
        // As seen on 7.2 under TCG: an oops on a secondary CPU at start-up.
        let early = "Booting from ROM...\n[    1.348785] Oops: int3: 0000 [#1] SMP NOPTI\n\
                     [    1.351825] Kernel panic - not syncing: Fatal exception in interrupt\n";
        assert!(panicked_before_init(early));
        // Once /init has printed, a panic is the run's own failure.
        let late = "@@R lsm lockdown,capability,bpf\n\
                    [   30.1] Kernel panic - not syncing: Attempted to kill init!\n";
        assert!(!panicked_before_init(late));
        // A guest that simply did not finish did not panic.
        assert!(!panicked_before_init("Booting from ROM...\n"));
    }
}
