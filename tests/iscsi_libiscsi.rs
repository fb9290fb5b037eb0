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

#[test]
fn iscsi_test_cu_minimal_disk_profile_passes() {
    for (digests, query) in [("None", ""), ("CRC32C,None", "?header_digest=crc32c")] {
        let t = target(None, digests);
        let url = format!("iscsi://{}/{IQN}/0{query}", t.addr());
        toemu_tests::assert_minimal_profile_passes(&url, |args| libiscsi("iscsi-test-cu", args).1);
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
