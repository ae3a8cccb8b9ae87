//! Unit tests of the ticket key file: parsing and its errors, sealing and opening, key
//! rotation in the file (stage, promote, rotate) and a ticketer following its file.

use super::*;

fn key(byte: u8) -> KeyMaterial {
    let mut k = [byte; KEY_LEN];
    // Distinct names and secrets per byte.
    k[NAME_LEN] = byte.wrapping_add(1);
    KeyMaterial(k)
}

fn ticketer_of(keys: &[KeyMaterial]) -> FileTicketer {
    FileTicketer::new(Path::new("/nonexistent/keys"), keys).expect("ticketer")
}

fn temp_file(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-ticket-keys-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join("keys")
}

#[test]
fn roundtrip_and_first_key_encrypts() {
    let t = ticketer_of(&[key(1), key(2)]);
    let ticket = t.encrypt(b"session state").expect("sealed");
    assert_eq!(&ticket[..NAME_LEN], key(1).name(), "the first key seals");
    assert_eq!(ticket.len(), NAME_LEN + NONCE_LEN + 13 + TAG_LEN);
    assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"session state"[..]));
    // Two tickets of one state differ (fresh nonce).
    assert_ne!(t.encrypt(b"session state"), Some(ticket));
    let s = t.snapshot();
    assert_eq!(
        (s.issued, s.decrypted, s.decrypted_old, s.refused),
        (2, 1, 0, 0)
    );
}

#[test]
fn every_key_decrypts_and_a_removed_key_is_refused() {
    let old = ticketer_of(&[key(1)]);
    let ticket = old.encrypt(b"state").expect("sealed");

    // Key 1 demoted to decrypt-only: still opens, counted as old.
    let t = ticketer_of(&[key(2), key(1)]);
    assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"state"[..]));
    assert_eq!(t.snapshot().decrypted_old, 1);

    // Key 1 gone from the file: refused, and counted.
    t.install(&[key(3), key(2)]).expect("install");
    assert_eq!(t.decrypt(&ticket), None);
    assert_eq!(t.snapshot().refused, 1);
}

#[test]
fn forged_damaged_and_short_tickets_are_refused() {
    let t = ticketer_of(&[key(1)]);
    let ticket = t.encrypt(b"state").expect("sealed");
    for i in [0, NAME_LEN, NAME_LEN + NONCE_LEN, ticket.len() - 1] {
        let mut bad = ticket.clone();
        bad[i] ^= 1;
        assert_eq!(t.decrypt(&bad), None, "byte {i} flipped");
    }
    for len in 0..NAME_LEN + NONCE_LEN + TAG_LEN {
        assert_eq!(
            t.decrypt(&ticket[..len.min(ticket.len())]),
            None,
            "{len} bytes"
        );
    }
    // Same name, other secret: the tag does not verify.
    let mut other = key(1);
    other.0[KEY_LEN - 1] ^= 0xff;
    assert_eq!(ticketer_of(&[other]).decrypt(&ticket), None);
}

#[test]
fn parses_comments_and_blank_lines() {
    let text = format!(
        "# fleet keys\n\n{}\n  # old\n{}\n\n",
        key(1).to_line(),
        key(2).to_line()
    );
    assert_eq!(parse(&text), Ok(vec![key(1), key(2)]));
}

#[test]
fn parse_errors_name_the_line() {
    let good = key(1).to_line();
    let cases = [
        (
            String::new(),
            "no key in the file (one base64 key per line)".to_string(),
        ),
        (
            "# only a comment\n".to_string(),
            "no key in the file (one base64 key per line)".to_string(),
        ),
        (
            format!("{good}\n!!notbase64\n"),
            "line 2: not base64".to_string(),
        ),
        (
            format!("# c\n{}\n", BASE64.encode([0u8; 48])),
            "line 2: a key is 80 bytes".to_string(),
        ),
        (
            format!("{good}\n\n{good}\n"),
            "line 3: its first 16 bytes (the key name) are those of line 1".to_string(),
        ),
    ];
    for (text, want) in cases {
        let e = parse(&text).expect_err(&text);
        assert!(
            e.to_string().starts_with(&want),
            "{text:?}: got {e}, want {want}"
        );
    }
}

#[test]
fn rotate_stage_and_promote_rewrite_the_file() {
    let path = temp_file("rotate");
    // rotate creates the file.
    let first = rotate(&path, DEFAULT_KEEP).expect("rotate");
    assert_eq!(first.len(), 1);
    assert_eq!(read(&path), Ok(first.clone()));
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "a new key file is private");
    }

    // stage: new key second, the encrypting key unchanged.
    let staged = stage(&path).expect("stage");
    assert_eq!(staged.len(), 2);
    assert_eq!(staged[0], first[0]);
    // promote: the staged key encrypts, the former first decrypts.
    let promoted = promote(&path, DEFAULT_KEEP).expect("promote");
    assert_eq!(promoted, vec![staged[1].clone(), first[0].clone()]);

    // rotate keeps `keep` keys after the new first one; the header comment stays.
    for _ in 0..3 {
        rotate(&path, DEFAULT_KEEP).expect("rotate");
    }
    let keys = read(&path).expect("read");
    assert_eq!(keys.len(), 1 + DEFAULT_KEEP);
    let text = std::fs::read_to_string(&path).expect("read");
    assert!(text.starts_with("# tern ticket keys"), "{text}");

    // promote with one key is an error, and leaves the file as it was.
    rotate(&path, 0).expect("rotate");
    let before = std::fs::read_to_string(&path).expect("read");
    assert!(promote(&path, DEFAULT_KEEP).is_err());
    assert_eq!(std::fs::read_to_string(&path).expect("read"), before);
    let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
}

#[test]
fn a_changed_file_is_followed_and_a_bad_one_keeps_the_keys() {
    let path = temp_file("follow");
    std::fs::write(&path, format!("{}\n", key(1).to_line())).expect("write");
    let t = FileTicketer::new(&path, &[key(1)]).expect("ticketer");
    let ticket = t.encrypt(b"s").expect("sealed");

    std::fs::write(&path, "garbage\n").expect("write");
    t.check_file();
    t.check_file();
    assert_eq!(
        t.snapshot().file_errors,
        1,
        "one bad file, logged and counted once"
    );
    assert!(t.decrypt(&ticket).is_some(), "the keys in force stay");

    std::fs::write(&path, format!("{}\n", key(2).to_line())).expect("write");
    t.check_file();
    assert_eq!(t.snapshot().key_loads, 2);
    assert_eq!(t.decrypt(&ticket), None, "key 1 left the file");
    assert_eq!(&t.encrypt(b"s").expect("sealed")[..NAME_LEN], key(2).name());
    let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
}

#[test]
fn one_ticketer_per_file() {
    let path = temp_file("shared");
    let a = ticketer(&TicketKeys {
        path: path.clone(),
        keys: vec![key(1)],
    })
    .expect("a");
    let b = ticketer(&TicketKeys {
        path: path.clone(),
        keys: vec![key(2), key(1)],
    })
    .expect("b");
    assert!(
        Arc::ptr_eq(&a, &b),
        "a reload naming the same file gets the same ticketer"
    );
    assert_eq!(&a.encrypt(b"s").expect("sealed")[..NAME_LEN], key(2).name());
    assert!(stats().iter().any(|(p, _)| *p == path));
    let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
}
