//! A bad configuration is refused by both `tern check-config` and `tern run`, with a message
//! that names the file and the field, and a non-zero exit (2).

use std::process::Command;

use tern_tests::certs::{write_self_signed, KeyKind};
use tern_tests::rig::{tern_binary, TempDir};

struct Case {
    name: &'static str,
    /// The config text; `{cert}` and `{key}` are replaced with real files.
    text: &'static str,
    /// The field the message must name, and another fragment it must contain.
    field: &'static str,
    fragment: &'static str,
}

const GOOD_TAIL: &str = "[backend]\nservers = [\"127.0.0.1:8080\"]\n";

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "missing cert file",
            text: "[[listener]]\naddress = \"127.0.0.1:8443\"\n[[certificate]]\ncert = \"/nonexistent/tern/site.pem\"\nkey = \"{key}\"\n",
            field: "certificate[0].cert",
            fragment: "/nonexistent/tern/site.pem",
        },
        Case {
            name: "bad address",
            text: "[[listener]]\naddress = \"127.0.0.1:99999\"\n[[certificate]]\ncert = \"{cert}\"\nkey = \"{key}\"\n",
            field: "listener[0].address",
            fragment: "127.0.0.1:99999",
        },
        Case {
            name: "unknown field",
            text: "[[listener]]\naddress = \"127.0.0.1:8443\"\nbacklog = 5\n[[certificate]]\ncert = \"{cert}\"\nkey = \"{key}\"\n",
            field: "listener[0]",
            fragment: "backlog",
        },
        Case {
            name: "unknown top-level table",
            text: "[[listener]]\naddress = \"127.0.0.1:8443\"\n[[certificate]]\ncert = \"{cert}\"\nkey = \"{key}\"\n[frontend]\nx = 1\n",
            field: "frontend",
            fragment: "unknown field",
        },
        Case {
            name: "bypass without interface",
            text: "[[listener]]\naddress = \"127.0.0.1:8443\"\nmode = \"bypass\"\n[[certificate]]\ncert = \"{cert}\"\nkey = \"{key}\"\n",
            field: "listener[0].interface",
            fragment: "required when mode = \"bypass\"",
        },
        Case {
            name: "control socket mode not octal",
            text: "[[listener]]\naddress = \"127.0.0.1:8443\"\n[[certificate]]\ncert = \"{cert}\"\nkey = \"{key}\"\n[control]\nmode = \"0668\"\n",
            field: "control.mode",
            fragment: "\"0668\" is not an octal mode",
        },
        Case {
            name: "control socket group unknown",
            text: "[[listener]]\naddress = \"127.0.0.1:8443\"\n[[certificate]]\ncert = \"{cert}\"\nkey = \"{key}\"\n[control]\ngroup = \"no-such-group-tern\"\n",
            field: "control.group",
            fragment: "no group named \"no-such-group-tern\"",
        },
        Case {
            name: "process user unknown",
            text: "[[listener]]\naddress = \"127.0.0.1:8443\"\n[[certificate]]\ncert = \"{cert}\"\nkey = \"{key}\"\n[process]\nuser = \"no-such-user-tern\"\n",
            field: "process.user",
            fragment: "no user named \"no-such-user-tern\"",
        },
    ]
}

fn render(case: &Case, dir: &TempDir) -> std::path::PathBuf {
    let c = write_self_signed(dir.path(), "site", &["tern.test"], KeyKind::EcdsaP256);
    let text = case
        .text
        .replace("{cert}", c.cert.to_str().expect("path"))
        .replace("{key}", c.key.to_str().expect("path"))
        + GOOD_TAIL;
    let path = dir.join("tern.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn bad_configs_are_refused_with_file_and_field() {
    for case in cases() {
        let dir = TempDir::new("badcfg");
        let path = render(&case, &dir);
        for args in [
            vec!["check-config", path.to_str().expect("path")],
            vec!["run", "--config", path.to_str().expect("path")],
        ] {
            let out = Command::new(tern_binary())
                .args(&args)
                .output()
                .expect("run tern");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{}: `tern {}` exits 2; stderr: {stderr}",
                case.name,
                args[0]
            );
            assert!(
                stderr.contains(path.to_str().expect("path")),
                "{}: names the file: {stderr}",
                case.name
            );
            assert!(
                stderr.contains(case.field),
                "{}: names the field {}: {stderr}",
                case.name,
                case.field
            );
            assert!(
                stderr.contains(case.fragment),
                "{}: says {:?}: {stderr}",
                case.name,
                case.fragment
            );
        }
    }
}

#[test]
fn a_good_config_passes_check_config() {
    let dir = TempDir::new("goodcfg");
    let c = write_self_signed(dir.path(), "site", &["tern.test"], KeyKind::EcdsaP256);
    let path = dir.join("tern.toml");
    std::fs::write(
        &path,
        format!(
            "[[listener]]\naddress = \"127.0.0.1:8443\"\n[[certificate]]\ncert = \"{}\"\nkey = \"{}\"\n{GOOD_TAIL}",
            c.cert.display(),
            c.key.display()
        ),
    )
    .expect("write");
    let out = Command::new(tern_binary())
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run tern");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}
