//! toe-iscsi's target against libiscsi (Debian `libiscsi-bin`), a real initiator: discovery
//! with `iscsi-ls` on std TCP (127.0.0.1), without authentication and with CHAP.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use toe_iscsi::login::{Credentials, OpParams, TargetConfig};
use toe_iscsi::scsi::{Disk, MemStore};
use toemu_lab::iscsi::TcpTarget;

const IQN: &str = "iqn.2026-12.org.toemu:disk";

/// Runs a libiscsi tool: (whether it succeeded, its standard output and error).
fn libiscsi(tool: &str, args: &[&str]) -> (bool, String) {
    let out = toemu_tests::run_tool(tool, "libiscsi-bin", args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The CHAP credentials the tests' target requires when asked to.
fn alice() -> Credentials {
    Credentials {
        user: "alice".into(),
        secret: b"secret-of-alice".to_vec(),
    }
}

fn target(chap: Option<Credentials>, digests: &str) -> TcpTarget {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    TcpTarget::start(
        l,
        TargetConfig {
            target_name: IQN.into(),
            alias: Some("toemu".into()),
            portal_group_tag: 1,
            chap,
            mutual: None,
            params: OpParams {
                header_digest: digests.into(),
                data_digest: digests.into(),
                ..OpParams::default()
            },
            cmd_window: 32,
        },
        Some(Arc::new(Mutex::new(Disk::new(
            Box::new(MemStore::new(64 << 20)),
            512,
            "TOEMU0001",
        )))),
    )
    .unwrap()
}

#[test]
fn iscsi_ls_discovers_the_target() {
    for (digests, query) in [("None", ""), ("CRC32C,None", "?header_digest=crc32c")] {
        let t = target(None, digests);
        let url = format!("iscsi://{}/{query}", t.addr());
        let (ok, out) = libiscsi("iscsi-ls", &[&url]);
        assert!(ok, "iscsi-ls {url} failed:\n{out}");
        let want = format!("Target:{IQN} Portal:{},1", t.addr());
        assert!(
            out.contains(&want),
            "iscsi-ls {url} printed:\n{out}\nwant {want}"
        );
    }
}

#[test]
fn iscsi_ls_logs_in_with_chap_and_a_wrong_secret_is_refused() {
    let t = target(Some(alice()), "None");
    let url = format!("iscsi://alice%secret-of-alice@{}/", t.addr());
    let (ok, out) = libiscsi("iscsi-ls", &[&url]);
    assert!(ok, "iscsi-ls with CHAP failed:\n{out}");
    assert!(out.contains(&format!("Target:{IQN}")), "{out}");
    let url = format!("iscsi://alice%guess@{}/", t.addr());
    let (ok, out) = libiscsi("iscsi-ls", &[&url]);
    assert!(
        !ok && !out.contains("Target:"),
        "a wrong secret logged in:\n{out}"
    );
    let url = format!("iscsi://{}/", t.addr());
    let (ok, out) = libiscsi("iscsi-ls", &[&url]);
    assert!(!ok, "no credentials logged in:\n{out}");
}

#[test]
fn libiscsi_tools_read_the_disk_identity_and_size() {
    let t = target(None, "CRC32C,None");
    let url = format!("iscsi://{}/{IQN}/0", t.addr());
    let (ok, out) = libiscsi("iscsi-inq", &[&url]);
    assert!(ok, "iscsi-inq failed:\n{out}");
    assert!(
        out.contains("TOEMU") && out.contains("VIRTUAL DISK"),
        "{out}"
    );
    let (ok, out) = libiscsi("iscsi-inq", &["-e", "1", "-c", "128", &url]);
    assert!(ok && out.contains("TOEMU0001"), "unit serial page:\n{out}");
    let (ok, out) = libiscsi("iscsi-readcapacity16", &[&url]);
    assert!(ok, "iscsi-readcapacity16 failed:\n{out}");
    // 64 MiB of 512-byte blocks: the last LBA is 131071
    for want in [
        "RETURNED LOGICAL BLOCK ADDRESS:131071",
        "LOGICAL BLOCK LENGTH IN BYTES:512",
        "Total size:67108864",
    ] {
        assert!(out.contains(want), "want {want}:\n{out}");
    }
    let base = format!("iscsi://{}/", t.addr());
    let (ok, out) = libiscsi("iscsi-ls", &["-s", &base]);
    assert!(ok, "iscsi-ls -s failed:\n{out}");
    assert!(
        out.contains("Lun:0") && out.contains("Type:DIRECT_ACCESS"),
        "{out}"
    );
}

/// The suites of the minimal disk profile (issue 9, check 1).
const MINIMAL: &[&str] = &[
    "SCSI.TestUnitReady",
    "SCSI.Inquiry",
    "SCSI.ReadCapacity10",
    "SCSI.ReadCapacity16",
    "SCSI.Read10",
    "SCSI.Read16",
    "SCSI.Write10",
    "SCSI.Write16",
    "SCSI.ModeSense6",
    "SCSI.Mandatory",
    "iSCSI.iSCSIcmdsn",
    "iSCSI.iSCSIdatasn",
    "iSCSI.iSCSIResiduals",
    "iSCSI.iSCSITMF",
];

/// Per-test verdicts of one `iscsi-test-cu -v` run: (passed, skipped, failed) test names.
/// CUnit counts a skip as a pass; libiscsi's tests log `[SKIPPED]` when they skip, so a
/// test whose lines hold that word is counted apart.
fn verdicts(out: &str) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut pass, mut skip, mut fail) = (Vec::new(), Vec::new(), Vec::new());
    let mut current: Option<(String, String)> = None;
    let mut close = |c: Option<(String, String)>| {
        if let Some((name, text)) = c {
            // CUnit's verdict ends the test's lines ("[FAILED]" inside them is libiscsi
            // logging a command that failed, which a test may expect).
            if text.ends_with("FAILED") {
                fail.push(name);
            } else if text.ends_with("passed") && text.contains("[SKIPPED]") {
                skip.push(name);
            } else if text.ends_with("passed") {
                pass.push(name);
            } else {
                fail.push(format!("{name} (no verdict)"));
            }
        }
    };
    // iscsi-test-cu's own probes between tests (set-up and teardown of each test look for
    // reservations to clear); their messages land on the lines of the tests around them.
    const PROBES: [&str; 2] = [
        "[SKIPPED] PERSISTENT RESERVE IN is not implemented.",
        "[SKIPPED] REPORT_SUPPORTED_OPCODES is not implemented.",
    ];
    for line in out.lines() {
        let line = PROBES
            .iter()
            .fold(line.to_string(), |l, p| l.replace(p, ""));
        let line = line.trim_end();
        if let Some(rest) = line.trim_start().strip_prefix("Test: ") {
            close(current.take());
            let name = rest.split(" ...").next().unwrap_or(rest).to_string();
            current = Some((name, rest.trim_end().to_string()));
        } else if line.contains("Run Summary") {
            close(current.take());
        } else if let Some((_, text)) = current.as_mut() {
            // Up to the verdict: what follows it is the suite's teardown (which probes
            // PERSISTENT RESERVE IN and logs a skip of its own).
            if !(text.ends_with("passed") || text.ends_with("FAILED")) {
                text.push('\n');
                text.push_str(line);
            }
        }
    }
    close(current);
    (pass, skip, fail)
}

#[test]
fn iscsi_test_cu_minimal_disk_profile_passes() {
    for (digests, query) in [("None", ""), ("CRC32C,None", "?header_digest=crc32c")] {
        let t = target(None, digests);
        let url = format!("iscsi://{}/{IQN}/0{query}", t.addr());
        let (mut pass, mut skip, mut fail) = (Vec::new(), Vec::new(), Vec::new());
        for suite in MINIMAL {
            let (_, out) = libiscsi("iscsi-test-cu", &["-d", "-v", "-t", suite, &url]);
            let (p, s, f) = verdicts(&out);
            assert!(
                !(p.is_empty() && s.is_empty() && f.is_empty()),
                "{suite}: no test ran:\n{out}"
            );
            pass.extend(p.into_iter().map(|n| format!("{suite}.{n}")));
            skip.extend(s.into_iter().map(|n| format!("{suite}.{n}")));
            fail.extend(f.into_iter().map(|n| format!("{suite}.{n}")));
        }
        eprintln!(
            "iscsi-test-cu minimal profile ({url}): {} passed, {} skipped, {} failed; skipped: {skip:?}",
            pass.len(),
            skip.len(),
            fail.len()
        );
        assert!(fail.is_empty(), "failed: {fail:?}");
        assert!(
            pass.len() >= 54,
            "only {} passed (skipped: {skip:?})",
            pass.len()
        );
    }
}

#[test]
fn our_initiator_discovers_logs_in_and_lists_the_lun() {
    let t = target(None, "CRC32C,None");
    for query in ["", "?header_digest=crc32c&data_digest=crc32c"] {
        let url: toemu_lab::iscsi::IscsiUrl =
            format!("iscsi://{}/{query}", t.addr()).parse().unwrap();
        let out = toemu_lab::iscsi::ls(&url, true).unwrap();
        assert_eq!(
            out,
            format!(
                "Target:{IQN} Portal:{},1\nLun:0 Type:DIRECT_ACCESS (Size:67108864 bytes, 512-byte blocks)\n",
                t.addr()
            )
        );
    }
    // CHAP against a target that requires it, and a wrong secret
    let t = target(Some(alice()), "None");
    let url = format!("iscsi://alice%secret-of-alice@{}/", t.addr());
    let out = toemu_lab::iscsi::ls(&url.parse().unwrap(), false).unwrap();
    assert!(out.starts_with(&format!("Target:{IQN}")), "{out}");
    let url = format!("iscsi://alice%nope@{}/", t.addr());
    let e = toemu_lab::iscsi::ls(&url.parse().unwrap(), false).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
}

#[test]
fn iscsi_urls_parse_as_libiscsi_writes_them() {
    use toemu_lab::iscsi::IscsiUrl;
    let u: IscsiUrl = "iscsi://bob%pw@10.0.0.2/iqn.x:y/3?header_digest=crc32c"
        .parse()
        .unwrap();
    assert_eq!(u.chap, Some(("bob".into(), "pw".into())));
    assert_eq!(u.portal, "10.0.0.2:3260");
    assert_eq!((u.target.as_deref(), u.lun), (Some("iqn.x:y"), Some(3)));
    assert!(u.header_digest && !u.data_digest);
    assert!("http://x/".parse::<IscsiUrl>().is_err());
    assert!("iscsi://h:1/t/x".parse::<IscsiUrl>().is_err());
    assert!("iscsi://h/?foo=1".parse::<IscsiUrl>().is_err());
}
