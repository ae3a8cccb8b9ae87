//! Build script of the `tern` package: builds the XDP program in `xdp-ebpf/` and leaves the
//! object at `$OUT_DIR/tern-xdp`, where `tern::bypass::xdp` embeds it with `aya::include_bytes_aligned!`.
//!
//! It owns the whole eBPF toolchain so that a fresh machine goes from clone to built with plain
//! `cargo build` and no manual step:
//! - nightly's `rust-src` component (for `-Z build-std=core`), added only when missing;
//! - bpf-linker, installed into the git-ignored `<workspace>/.tools/` and linked against the
//!   libLLVM that ships inside the nightly toolchain (Debian's LLVM is too old, and bpf-linker's
//!   default LLVM is too new). A stamp file records the libLLVM file name; when nightly changes,
//!   bpf-linker is re-installed.
//! - the nested `cargo +nightly build --release` of `xdp-ebpf` (its own workspace, whose
//!   `.cargo/config.toml` selects bpfel-unknown-none, build-std and BTF), into
//!   `<workspace>/target/ebpf`.
//!
//! The nested cargo runs with the outer build's compiler settings removed (toolchain override,
//! RUSTC and wrappers such as clippy-driver, RUSTFLAGS, CARGO_* build variables): they describe
//! the host build and would break or silently change the eBPF one. Installation steps run under
//! an exclusive lock on `.tools/.lock`, so concurrent `cargo build` and `cargo clippy` do not
//! install twice. Failures stop the build with the failing command and its stderr.
//!
//! It does not own the eBPF program's content (`xdp-ebpf/src`) or its build settings
//! (`xdp-ebpf/.cargo/config.toml`), and it uses only std.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// bpf-linker release to install; 0.13.0 is the one verified against nightly's LLVM 22 here.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The toolchain that builds the eBPF object and whose libLLVM bpf-linker links against.
const NIGHTLY: &str = "nightly";
/// Name of the eBPF binary target in `xdp-ebpf/Cargo.toml`, and of the file left in `OUT_DIR`.
const EBPF_OBJECT: &str = "tern-xdp";
const EBPF_TARGET: &str = "bpfel-unknown-none";

/// A build step that failed, with everything needed to understand why.
struct BuildError(String);

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

type Result<T> = std::result::Result<T, BuildError>;

fn main() {
    if let Err(err) = run() {
        eprintln!("error: building the XDP program (xdp-ebpf) failed\n\n{err}");
        std::process::exit(1);
    }
}

/// Fixed paths of the workspace this build script belongs to.
struct Layout {
    workspace: PathBuf,
    ebpf_crate: PathBuf,
    tools: PathBuf,
    stamp: PathBuf,
    out_dir: PathBuf,
}

fn run() -> Result<()> {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .ok_or_else(|| BuildError(format!("{} has no parent", manifest_dir.display())))?
        .to_path_buf();
    let tools = workspace.join(".tools");
    let layout = Layout {
        ebpf_crate: workspace.join("xdp-ebpf"),
        stamp: tools.join("bpf-linker.stamp"),
        out_dir: PathBuf::from(env_var("OUT_DIR")?),
        tools,
        workspace,
    };

    // Printed first: if a later step fails, cargo still knows what to watch.
    println!("cargo:rerun-if-changed=build.rs");
    for input in [
        "xdp-ebpf/src",
        "xdp-ebpf/Cargo.toml",
        "xdp-ebpf/Cargo.lock",
        "xdp-ebpf/rust-toolchain.toml",
        "xdp-ebpf/.cargo/config.toml",
        "common/src",
        "common/Cargo.toml",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            layout.workspace.join(input).display()
        );
    }
    println!("cargo:rerun-if-changed={}", layout.stamp.display());

    let rustup = find_rustup();
    let nightly = {
        let _lock = ToolsLock::acquire(&layout.tools)?;
        let nightly = ensure_nightly(&rustup)?;
        ensure_bpf_linker(&rustup, &nightly, &layout)?;
        nightly
    };
    // A nightly update changes rustc (rebuild the object) and may rename libLLVM (re-install
    // bpf-linker); watching both makes cargo rerun this script then.
    println!("cargo:rerun-if-changed={}", nightly.rustc.display());
    println!("cargo:rerun-if-changed={}", nightly.libllvm.display());

    build_object(&rustup, &layout)
}

/// What this script needs to know about the installed nightly toolchain.
struct Nightly {
    /// LLVM major version, e.g. 22; selects bpf-linker's `llvm-NN` feature.
    llvm_major: u32,
    /// Full path of `libLLVM.so.*` inside the toolchain's `lib/`.
    libllvm: PathBuf,
    /// Path of the toolchain's rustc binary.
    rustc: PathBuf,
}

/// Makes sure nightly with `rust-src` is installed and describes it. Runs under the tools lock.
fn ensure_nightly(rustup: &Path) -> Result<Nightly> {
    let mut version = rustup_cmd(rustup);
    version.args(["run", NIGHTLY, "rustc", "-vV"]);
    let version = match run_captured(&mut version) {
        Ok(output) => output,
        Err(_) => {
            // Not installed: the channel name (never a dated nightly) is what rustup can fetch.
            let mut install = rustup_cmd(rustup);
            install.args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]);
            install.args(["--component", "rust-src"]);
            run_captured(&mut install)?;
            let mut version = rustup_cmd(rustup);
            version.args(["run", NIGHTLY, "rustc", "-vV"]);
            run_captured(&mut version)?
        }
    };
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    let llvm_major = parse_llvm_major(&version).ok_or_else(|| {
        BuildError(format!(
            "cannot find the LLVM major version in `rustup run {NIGHTLY} rustc -vV`:\n{version}"
        ))
    })?;

    let mut sysroot = rustup_cmd(rustup);
    sysroot.args(["run", NIGHTLY, "rustc", "--print", "sysroot"]);
    let sysroot = run_captured(&mut sysroot)?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());

    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        let mut add = rustup_cmd(rustup);
        add.args(["component", "add", "rust-src", "--toolchain", NIGHTLY]);
        run_captured(&mut add)?;
    }

    let libllvm = find_libllvm(&sysroot.join("lib"))?;
    Ok(Nightly {
        llvm_major,
        libllvm,
        rustc: sysroot.join("bin/rustc"),
    })
}

/// `LLVM version: 22.1.4` → 22.
fn parse_llvm_major(rustc_vv: &str) -> Option<u32> {
    let version = rustc_vv
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))?;
    version.trim().split('.').next()?.parse().ok()
}

/// The toolchain's libLLVM, by its real file name (`libLLVM.so.22.1-rust-…`); the
/// `libLLVM-22-rust-….so` next to it is only a linker script pointing at that file.
fn find_libllvm(lib: &Path) -> Result<PathBuf> {
    let entries = fs::read_dir(lib)
        .map_err(|err| BuildError(format!("cannot list {}: {err}", lib.display())))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|name| name.starts_with("libLLVM.so."))
        })
        .collect();
    found.sort();
    found.pop().ok_or_else(|| {
        BuildError(format!(
            "no libLLVM.so.* in {}: the {NIGHTLY} toolchain looks incomplete",
            lib.display()
        ))
    })
}

/// Installs bpf-linker into `.tools/bin` unless the stamp says the installed one was linked
/// against this nightly's libLLVM. Runs under the tools lock.
fn ensure_bpf_linker(rustup: &Path, nightly: &Nightly, layout: &Layout) -> Result<()> {
    let lib_dir = nightly.libllvm.parent().unwrap_or(Path::new("/"));
    let lib_name = nightly
        .libllvm
        .file_name()
        .and_then(OsStr::to_str)
        .ok_or_else(|| BuildError(format!("bad libLLVM path {}", nightly.libllvm.display())))?;
    let stamp = format!(
        "bpf-linker {BPF_LINKER_VERSION} llvm-{} {lib_name}\n",
        nightly.llvm_major
    );
    let binary = layout.tools.join("bin/bpf-linker");
    if binary.is_file() && fs::read_to_string(&layout.stamp).is_ok_and(|s| s == stamp) {
        return Ok(());
    }

    println!(
        "cargo:warning=installing bpf-linker {BPF_LINKER_VERSION} (llvm-{}, {lib_name}) into {} \
         (one time, about a minute)",
        nightly.llvm_major,
        layout.tools.display()
    );
    // Link against the toolchain's own libLLVM by its exact file name (there is no
    // libLLVM.so symlink to find with -lLLVM), and find it at run time through an rpath.
    let lib_dir = lib_dir.display();
    let rustflags = format!(
        "-L native={lib_dir} -l dylib:+verbatim={lib_name} -C link-arg=-Wl,-rpath,{lib_dir}"
    );
    let features = format!("llvm-{},no-llvm-linking", nightly.llvm_major);
    let mut install = nested_cargo(rustup, NIGHTLY);
    install
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ])
        .args(["--no-default-features", "--features", &features])
        .arg("--root")
        .arg(&layout.tools)
        .env("RUSTFLAGS", rustflags)
        .current_dir(&layout.tools);
    run_captured(&mut install)?;
    if !binary.is_file() {
        return Err(BuildError(format!(
            "`cargo install bpf-linker` succeeded but {} is missing",
            binary.display()
        )));
    }
    // Written last: a stamp only ever describes a complete install.
    fs::write(&layout.stamp, stamp)
        .map_err(|err| BuildError(format!("cannot write {}: {err}", layout.stamp.display())))
}

/// Builds `xdp-ebpf` and copies the object into `OUT_DIR`.
fn build_object(rustup: &Path, layout: &Layout) -> Result<()> {
    let target_dir = layout.workspace.join("target").join("ebpf");
    let path = {
        let mut dirs = vec![layout.tools.join("bin")];
        dirs.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
        env::join_paths(dirs)
            .map_err(|err| BuildError(format!("cannot build PATH for the eBPF build: {err}")))?
    };
    let mut build = nested_cargo(rustup, NIGHTLY);
    build
        .args(["build", "--release", "--bin", EBPF_OBJECT])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&layout.ebpf_crate)
        .env("PATH", path);
    run_captured(&mut build)?;

    let built = target_dir
        .join(EBPF_TARGET)
        .join("release")
        .join(EBPF_OBJECT);
    let dest = layout.out_dir.join(EBPF_OBJECT);
    // Copy beside, then rename over: a target dir seeded with hard links (several worktrees
    // sharing one inode) must never see its other names rewritten by this build.
    let partial = layout.out_dir.join(format!("{EBPF_OBJECT}.partial"));
    fs::copy(&built, &partial)
        .and_then(|_| fs::rename(&partial, &dest))
        .map_err(|err| {
            BuildError(format!(
                "cannot copy {} to {}: {err}",
                built.display(),
                dest.display()
            ))
        })?;
    Ok(())
}

/// Exclusive lock on `.tools/.lock`, held while anything is checked or installed. `flock`
/// semantics: the kernel releases it when the holder exits, so a killed build leaves no stale
/// lock behind.
struct ToolsLock(File);

impl ToolsLock {
    fn acquire(tools: &Path) -> Result<ToolsLock> {
        fs::create_dir_all(tools)
            .map_err(|err| BuildError(format!("cannot create {}: {err}", tools.display())))?;
        let path = tools.join(".lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|err| BuildError(format!("cannot open {}: {err}", path.display())))?;
        file.lock()
            .map_err(|err| BuildError(format!("cannot lock {}: {err}", path.display())))?;
        Ok(ToolsLock(file))
    }
}

impl Drop for ToolsLock {
    fn drop(&mut self) {
        // Closing the file would release it too; unlocking first makes the intent explicit.
        let _ = self.0.unlock();
    }
}

/// `rustup` from PATH, else from `$CARGO_HOME/bin` or `~/.cargo/bin` (cargo may have been
/// started without rustup's directory on PATH).
fn find_rustup() -> PathBuf {
    let on_path = env::var_os("PATH")
        .map(|path| {
            env::split_paths(&path)
                .map(|dir| dir.join("rustup"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let homes = [
        env::var_os("CARGO_HOME").map(|home| PathBuf::from(home).join("bin/rustup")),
        env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo/bin/rustup")),
    ];
    on_path
        .into_iter()
        .chain(homes.into_iter().flatten())
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from("rustup"))
}

fn rustup_cmd(rustup: &Path) -> Command {
    let mut cmd = Command::new(rustup);
    clean_env(&mut cmd);
    cmd
}

/// `rustup run <toolchain> cargo` with the outer build's environment removed.
fn nested_cargo(rustup: &Path, toolchain: &str) -> Command {
    let mut cmd = rustup_cmd(rustup);
    cmd.args(["run", toolchain, "cargo"]);
    cmd
}

/// Removes the variables through which the outer build would leak into a nested one.
fn clean_env(cmd: &mut Command) {
    for (key, _) in env::vars_os() {
        if leaks_into_nested_build(&key) {
            cmd.env_remove(&key);
        }
    }
    if let Some(paths) = env::var_os("LD_LIBRARY_PATH") {
        match own_library_path(&paths) {
            Some(kept) => cmd.env("LD_LIBRARY_PATH", kept),
            None => cmd.env_remove("LD_LIBRARY_PATH"),
        };
    }
}

/// `LD_LIBRARY_PATH` without what cargo and rustup added for the outer build: the outer
/// toolchain's `lib/` (whose libLLVM and librustc_driver must not shadow nightly's) and the outer
/// target directory. Whatever the user set stays.
fn own_library_path(paths: &OsStr) -> Option<OsString> {
    let rustup_home = env::var_os("RUSTUP_HOME").map(PathBuf::from);
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
    let outer_profile_dir = env::var_os("OUT_DIR")
        .map(PathBuf::from)
        .and_then(|out| out.ancestors().nth(3).map(Path::to_path_buf));
    let kept: Vec<PathBuf> = env::split_paths(paths)
        .filter(|dir| {
            let outer = [&rustup_home, &outer_profile_dir]
                .into_iter()
                .flatten()
                .any(|prefix| dir.starts_with(prefix));
            !outer
        })
        .collect();
    if kept.is_empty() {
        return None;
    }
    env::join_paths(kept).ok()
}

fn leaks_into_nested_build(key: &OsStr) -> bool {
    let Some(key) = key.to_str() else {
        return false;
    };
    // Toolchain selection and compiler settings of the outer build (RUSTC_WORKSPACE_WRAPPER is
    // clippy-driver under `cargo clippy`).
    const EXACT: &[&str] = &[
        "RUSTUP_TOOLCHAIN",
        "RUSTUP_TOOLCHAIN_SOURCE",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_LINKER",
        "RUSTDOC",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "CLIPPY_ARGS",
        "CARGO",
        // Set by cargo for build scripts; they describe this package's host build.
        "TARGET",
        "HOST",
        "OUT_DIR",
        "OPT_LEVEL",
        "PROFILE",
        "DEBUG",
        "NUM_JOBS",
    ];
    // CARGO_* describes the outer build (CARGO_ENCODED_RUSTFLAGS, CARGO_BUILD_TARGET,
    // CARGO_TARGET_DIR, CARGO_PROFILE_*, CARGO_CFG_*, CARGO_PKG_*, ...), except for these, which
    // are where cargo and its registry live and how to reach them, and the jobserver, which keeps
    // the nested build within the outer `-j`.
    const KEEP_CARGO: &[&str] = &[
        "CARGO_HOME",
        "CARGO_MAKEFLAGS",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRY_",
        "CARGO_REGISTRIES_",
        "CARGO_TERM_",
    ];
    if EXACT.contains(&key) || key.starts_with("__CARGO") || key.starts_with("DEP_") {
        return true;
    }
    key.starts_with("CARGO_") && !KEEP_CARGO.iter().any(|keep| key.starts_with(keep))
}

fn env_var(key: &str) -> Result<OsString> {
    env::var_os(key).ok_or_else(|| BuildError(format!("{key} is not set (run this through cargo)")))
}

/// Runs `cmd` to completion with its output captured; a failure becomes an error that shows the
/// command and its stderr.
fn run_captured(cmd: &mut Command) -> Result<Output> {
    let output = cmd
        .output()
        .map_err(|err| BuildError(format!("cannot run {}: {err}", describe(cmd))))?;
    if output.status.success() {
        return Ok(output);
    }
    Err(BuildError(format!(
        "command failed ({}): {}\n--- stderr ---\n{}{}",
        output.status,
        describe(cmd),
        String::from_utf8_lossy(&output.stderr),
        if output.stdout.is_empty() {
            String::new()
        } else {
            format!(
                "--- stdout ---\n{}",
                String::from_utf8_lossy(&output.stdout)
            )
        }
    )))
}

fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    if let Some(dir) = cmd.get_current_dir() {
        text.push_str(&format!(" (in {})", dir.display()));
    }
    text
}
