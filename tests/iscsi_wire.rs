//! toe-iscsi's PDUs read by an implementation no one here wrote: every opcode is emitted
//! into a TCP stream to port 3260, captured to pcap, and Wireshark's iSCSI dissector
//! (tshark) must decode each PDU with the opcode, task tag, sequence numbers and flags it was
//! given, and flag nothing as malformed.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::wire::TcpControl;
use toe_iscsi::wire::*;
use toemu_tests::{tcp_frame, tshark};

const INITIATOR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 40_000);
const TARGET: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 3260);

/// The exchange: (from the initiator?, header, data).
fn exchange() -> Vec<(bool, Repr, Vec<u8>)> {
    let lun = lun_field(0);
    let mut text = Vec::new();
    toe_iscsi::text::encode_pairs(
        &[
            ("InitiatorName", "iqn.2026-12.org.toemu:test"),
            ("SessionType", "Normal"),
            ("TargetName", "iqn.2026-12.org.toemu:disk"),
        ],
        &mut text,
    );
    let login = Login {
        transit: true,
        cont: false,
        csg: 1,
        nsg: 3,
        version_max: 0,
        version: 0,
        isid: [0x80, 0x12, 0x34, 0x56, 0, 1],
        tsih: 0,
        itt: 0x10,
        cid: 0,
        sn: 1,
        exp_sn: 0,
        max_cmd_sn: 0,
        status_class: 0,
        status_detail: 0,
    };
    let read10 = [0x28, 0, 0, 0, 0, 0x10, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0];
    let write10 = [0x2a, 0, 0, 0, 0, 0x20, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0];
    let mut rejected = [0u8; BHS_LEN];
    Repr::NopOut(Nop {
        immediate: true,
        lun,
        itt: 0x77,
        ttt: RESERVED_TAG,
        sn: 9,
        exp_sn: 9,
        max_cmd_sn: 0,
    })
    .emit(&mut rejected);
    vec![
        (true, Repr::LoginRequest(login), text),
        (
            false,
            Repr::LoginResponse(Login {
                tsih: 5,
                sn: 0,
                exp_sn: 1,
                max_cmd_sn: 32,
                ..login
            }),
            b"HeaderDigest=None\0DataDigest=None\0".to_vec(),
        ),
        (
            true,
            Repr::ScsiCommand(ScsiCommand {
                immediate: false,
                final_: true,
                read: true,
                write: false,
                attr: 1,
                lun,
                itt: 0x11,
                expected_len: 4096,
                cmd_sn: 1,
                exp_stat_sn: 1,
                cdb: read10,
            }),
            vec![],
        ),
        (
            false,
            Repr::DataIn(DataIn {
                final_: true,
                status: Some(0),
                lun,
                itt: 0x11,
                ttt: RESERVED_TAG,
                stat_sn: 1,
                exp_cmd_sn: 2,
                max_cmd_sn: 33,
                data_sn: 0,
                buffer_offset: 0,
                ..Default::default()
            }),
            vec![0xa5; 4096],
        ),
        (
            true,
            Repr::ScsiCommand(ScsiCommand {
                immediate: false,
                final_: false,
                read: false,
                write: true,
                attr: 1,
                lun,
                itt: 0x12,
                expected_len: 8192,
                cmd_sn: 2,
                exp_stat_sn: 2,
                cdb: write10,
            }),
            vec![0x5a; 4096],
        ),
        (
            false,
            Repr::R2t(R2t {
                lun,
                itt: 0x12,
                ttt: 0x99,
                stat_sn: 2,
                exp_cmd_sn: 3,
                max_cmd_sn: 34,
                r2t_sn: 0,
                buffer_offset: 4096,
                desired_len: 4096,
            }),
            vec![],
        ),
        (
            true,
            Repr::DataOut(DataOut {
                final_: true,
                lun,
                itt: 0x12,
                ttt: 0x99,
                exp_stat_sn: 2,
                data_sn: 0,
                buffer_offset: 4096,
            }),
            vec![0x5a; 4096],
        ),
        (
            false,
            Repr::ScsiResponse(ScsiResponse {
                itt: 0x12,
                stat_sn: 2,
                exp_cmd_sn: 3,
                max_cmd_sn: 34,
                ..Default::default()
            }),
            vec![],
        ),
        (
            true,
            Repr::TaskMgmtRequest(TaskMgmtRequest {
                immediate: true,
                function: 1,
                lun,
                itt: 0x13,
                ref_task_tag: 0x12,
                cmd_sn: 3,
                exp_stat_sn: 3,
                ref_cmd_sn: 2,
                exp_data_sn: 0,
            }),
            vec![],
        ),
        (
            false,
            Repr::TaskMgmtResponse(TaskMgmtResponse {
                response: 1,
                itt: 0x13,
                stat_sn: 3,
                exp_cmd_sn: 3,
                max_cmd_sn: 34,
            }),
            vec![],
        ),
        (
            false,
            Repr::Reject(Reject {
                reason: 9,
                stat_sn: 4,
                exp_cmd_sn: 3,
                max_cmd_sn: 34,
                data_sn: 0,
            }),
            rejected.to_vec(),
        ),
        (
            true,
            Repr::LogoutRequest(LogoutRequest {
                immediate: true,
                reason: 0,
                itt: 0x14,
                cid: 0,
                cmd_sn: 3,
                exp_stat_sn: 5,
            }),
            vec![],
        ),
        (
            false,
            Repr::LogoutResponse(LogoutResponse {
                response: 0,
                itt: 0x14,
                stat_sn: 5,
                exp_cmd_sn: 4,
                max_cmd_sn: 35,
                time2wait: 2,
                time2retain: 20,
            }),
            vec![],
        ),
    ]
}

#[test]
fn tshark_decodes_every_pdu_as_it_was_emitted() {
    let framing = Framing::default();
    let dir = std::env::temp_dir().join(format!("toemu-iscsi-wire-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("iscsi.pcap");
    let file = std::fs::File::create(&path).unwrap();
    let mut pcap = toe_nic::pcap::PcapWriter::new(file).unwrap();
    let (mut seq_i, mut seq_t) = (1000u32, 5000u32);
    let pdus = exchange();
    for (k, (from_initiator, repr, data)) in pdus.iter().enumerate() {
        let mut bytes = Vec::new();
        framing.emit(repr, &[], data, &mut bytes).unwrap();
        let (src, dst, seq, ack) = if *from_initiator {
            (INITIATOR, TARGET, &mut seq_i, seq_t)
        } else {
            (TARGET, INITIATOR, &mut seq_t, seq_i)
        };
        let f = tcp_frame(
            src,
            dst,
            [2, 0, 0, 0, 0, 2],
            TcpControl::Psh,
            *seq,
            Some(ack),
            &bytes,
        );
        *seq = seq.wrapping_add(bytes.len() as u32);
        pcap.write_frame(smoltcp::time::Instant::from_millis(k as i64), &f)
            .unwrap();
    }
    drop(pcap);
    let file = path.to_str().unwrap();
    let malformed = tshark(&[
        "-r",
        file,
        "-Y",
        "_ws.malformed || _ws.expert.severity >= error",
    ]);
    assert!(malformed.trim().is_empty(), "tshark flags:\n{malformed}");
    let out = tshark(&[
        "-r",
        file,
        "-Y",
        "iscsi",
        "-T",
        "fields",
        "-E",
        "separator=|",
        "-e",
        "iscsi.opcode",
        "-e",
        "iscsi.initiatortasktag",
        "-e",
        "iscsi.datasegmentlength",
        "-e",
        "iscsi.cmdsn",
        "-e",
        "iscsi.statsn",
        "-e",
        "iscsi.targettransfertag",
        "-e",
        "iscsi.bufferOffset",
    ]);
    // opcode | ITT | DataSegmentLength | CmdSN | StatSN | TTT | Buffer Offset, as RFC 7143
    // places them (the Reject row also shows the NOP-Out header it carries).
    let want = "\
0x03|0x00000010|98|1|||
0x23|0x00000010|34||0||
0x01|0x00000011|0|1|||
0x25|0x00000011|4096||1||0
0x01|0x00000012|4096|2|||
0x31|0x00000012|0||2|0x00000099|4096
0x05|0x00000012|4096|||0x00000099|4096
0x21|0x00000012|0||2||
0x02|0x00000013|0|3|||
0x22|0x00000013|||3||
0x3f,0x00|0x00000077|48,0|9|4|0xffffffff|
0x06|0x00000014|0|3|||
0x26|0x00000014|0||5||
";
    assert_eq!(out, want, "tshark's reading:\n{out}");
    assert_eq!(out.lines().count(), pdus.len());
    // Flags: SCSI Command F/R/W, Data-In S, login T/CSG/NSG, and the text keys.
    let flags = tshark(&[
        "-r",
        file,
        "-Y",
        "iscsi.opcode == 0x01 || iscsi.opcode == 0x25 || iscsi.opcode == 0x03",
        "-T",
        "fields",
        "-E",
        "separator=|",
        "-e",
        "iscsi.scsicommand.F",
        "-e",
        "iscsi.scsicommand.R",
        "-e",
        "iscsi.scsicommand.W",
        "-e",
        "iscsi.scsidata.S",
        "-e",
        "iscsi.login.T",
        "-e",
        "iscsi.login.csg",
        "-e",
        "iscsi.login.nsg",
        "-e",
        "iscsi.keyvalue",
    ]);
    // login T=1 CSG=1 NSG=3 with its keys; READ(10) F R; Data-In S; WRITE(10) W without F
    // (Data-Out follows)
    let want = "\
||||1|0x01|0x03|InitiatorName=iqn.2026-12.org.toemu:test,SessionType=Normal,TargetName=iqn.2026-12.org.toemu:disk
1|1|0|||||
|||1||||
0|0|1|||||
";
    assert_eq!(flags, want, "tshark's flags:\n{flags}");
    let _ = std::fs::remove_dir_all(&dir);
}
