//! Writes a transaction of [`Command`]s straight to the kernel: one nf_tables batch over a
//! `NETLINK_NETFILTER` socket, applied whole or not at all, as `nft -f` does.
//!
//! Why not `nft -f`: before writing anything, the `nft` CLI reads the table's every chain and
//! set into its cache (it resolves names itself); with 10,000 Services that costs 25–36 ms per
//! change, whatever the change. The kernel resolves names on its own, so a change written here
//! costs only its own few messages. The whole table is still written with `nft -f` (its fixed
//! part uses many more expression kinds than the per-Service commands here).
//!
//! The messages are those `nft` sends for the same text (`nft --debug=netlink` shows the
//! expressions): the tests write each command both ways and compare `nft list table`.

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use anyhow::{Context, bail};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, netlink};

use super::TABLE;
use super::nft::{Command, Key, Rule};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFPROTO_IPV4: u8 = 2;

const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
/// A list's element (rule expressions, set elements).
const NFTA_LIST_ELEM: u16 = 1;

/// Registers: the verdict and the first two 16-byte ones.
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;
const REG_2: u32 = 2;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
/// nft's datatype number of `ipv4_addr` (set key types).
const TYPE_IPADDR: u32 = 7;
const NFT_SET_TIMEOUT: u32 = 0x10;
/// `flags dynamic`: updated from the packet path.
const NFT_SET_EVAL: u32 = 0x20;
const NFT_META_L4PROTO: u32 = 16;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;

/// Netlink messages with their attributes, in the host's byte order (values in network order,
/// as nf_tables wants them).
#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
    /// Where each open nest (or message) starts.
    open: Vec<usize>,
}

impl Writer {
    fn message(&mut self, kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) {
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `end_message`
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        // nfgenmsg: family, version 0, resource id (big endian).
        self.buf.extend_from_slice(&[family, 0]);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
    }

    fn end_message(&mut self) {
        let start = self.open.pop().expect("a message is open");
        let length = u32::try_from(self.buf.len() - start).unwrap_or(u32::MAX);
        self.buf[start..start + 4].copy_from_slice(&length.to_ne_bytes());
    }

    fn attr(&mut self, kind: u16, data: &[u8]) {
        let length = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&length.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
    }

    fn string(&mut self, kind: u16, value: &str) {
        let mut data = Vec::with_capacity(value.len() + 1);
        data.extend_from_slice(value.as_bytes());
        data.push(0);
        self.attr(kind, &data);
    }

    fn u32(&mut self, kind: u16, value: u32) {
        self.attr(kind, &value.to_be_bytes());
    }

    fn nest(&mut self, kind: u16) {
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    }

    fn end(&mut self) {
        let start = self.open.pop().expect("a nest is open");
        let length = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
        self.buf[start..start + 2].copy_from_slice(&length.to_ne_bytes());
    }

    /// `NFTA_DATA_VALUE` in a nest of `kind`.
    fn value(&mut self, kind: u16, bytes: &[u8]) {
        self.nest(kind);
        self.attr(1, bytes);
        self.end();
    }

    /// `NFTA_DATA_VERDICT` (a jump or goto to `chain`) in a nest of `kind`.
    fn verdict(&mut self, kind: u16, code: i32, chain: &str) {
        self.nest(kind);
        self.nest(2);
        self.attr(1, &code.to_be_bytes());
        self.string(2, chain);
        self.end();
        self.end();
    }

    /// One expression of a rule: its name and its attributes.
    fn expr(&mut self, name: &str, data: impl FnOnce(&mut Writer)) {
        self.nest(NFTA_LIST_ELEM);
        self.string(1, name);
        self.nest(2);
        data(self);
        self.end();
        self.end();
    }

    /// `ip saddr` into register 1.
    fn source_address(&mut self) {
        self.expr("payload", |w| {
            w.u32(1, REG_1); // dreg
            w.u32(2, 1); // base: network header
            w.u32(3, 12); // offset
            w.u32(4, 4); // length
        });
    }

    /// `register 1 == bytes`
    fn equals(&mut self, bytes: &[u8]) {
        self.expr("cmp", |w| {
            w.u32(1, REG_1);
            w.u32(2, 0); // NFT_CMP_EQ
            w.value(3, bytes);
        });
    }

    /// `numgen random mod n == 0` (nothing for n ≤ 1).
    fn pick(&mut self, n: u32) {
        if n <= 1 {
            return;
        }
        self.expr("numgen", |w| {
            w.u32(1, REG_1);
            w.u32(2, n); // modulus
            w.u32(3, 1); // NFT_NG_RANDOM
            w.u32(4, 0); // offset
        });
        self.equals(&0u32.to_be_bytes());
    }

    fn jump(&mut self, code: i32, chain: &str) {
        self.expr("immediate", |w| {
            w.u32(1, REG_VERDICT);
            w.verdict(2, code, chain);
        });
    }

    fn rule(&mut self, rule: &Rule) {
        match rule {
            Rule::Remember { set } => {
                self.source_address();
                self.expr("dynset", |w| {
                    w.string(1, set);
                    w.u32(3, 1); // NFT_DYNSET_OP_UPDATE
                    w.u32(4, REG_1);
                });
            }
            Rule::Dnat { pick, protocol, ip, port } => {
                self.pick(*pick);
                self.expr("meta", |w| {
                    w.u32(2, NFT_META_L4PROTO);
                    w.u32(1, REG_1);
                });
                self.equals(&[*protocol]);
                self.immediate(REG_1, &ip.octets());
                self.immediate(REG_2, &port.to_be_bytes());
                self.expr("nat", |w| {
                    w.u32(1, 1); // NFT_NAT_DNAT
                    w.u32(2, u32::from(NFPROTO_IPV4));
                    w.u32(3, REG_1); // address
                    w.u32(5, REG_2); // port
                    w.u32(7, NF_NAT_RANGE_PROTO_SPECIFIED);
                });
            }
            Rule::Sticky { set, chain } => {
                self.source_address();
                self.expr("lookup", |w| {
                    w.string(1, set);
                    w.u32(2, REG_1);
                });
                self.jump(NFT_GOTO, chain);
            }
            Rule::Goto { pick, chain } => {
                self.pick(*pick);
                self.jump(NFT_GOTO, chain);
            }
            Rule::Jump { chain } => self.jump(NFT_JUMP, chain),
        }
    }

    fn immediate(&mut self, register: u32, bytes: &[u8]) {
        self.expr("immediate", |w| {
            w.u32(1, register);
            w.value(2, bytes);
        });
    }

    fn elements<'a>(&mut self, set: &str, elements: impl Iterator<Item = (&'a Key, Option<&'a String>)>) {
        self.string(1, TABLE);
        self.string(2, set);
        self.nest(3);
        for (key, chain) in elements {
            self.nest(NFTA_LIST_ELEM);
            self.value(1, &key.bytes());
            if let Some(chain) = chain {
                self.verdict(2, NFT_GOTO, chain);
            }
            self.end();
        }
        self.end();
    }

    /// One command as its message.
    fn command(&mut self, command: &Command, seq: u32, flags: u16) {
        let message = |w: &mut Writer, kind: u16, more: u16| {
            w.message(NFNL_SUBSYS_NFTABLES << 8 | kind, NLM_F_REQUEST | flags | more, seq, NFPROTO_IPV4, 0);
        };
        match command {
            Command::AddSet { name, timeout } => {
                message(self, NFT_MSG_NEWSET, NLM_F_CREATE);
                self.string(1, TABLE);
                self.string(2, name);
                self.u32(3, NFT_SET_TIMEOUT | NFT_SET_EVAL);
                self.u32(4, TYPE_IPADDR);
                self.u32(5, 4); // key length
                self.u32(10, seq); // set id: unique in the batch
                let millis = u64::try_from(*timeout).unwrap_or(0).saturating_mul(1000);
                self.attr(11, &millis.to_be_bytes());
            }
            Command::DeleteSet { name } => {
                message(self, NFT_MSG_DELSET, 0);
                self.string(1, TABLE);
                self.string(2, name);
            }
            Command::AddChain { name } => {
                message(self, NFT_MSG_NEWCHAIN, NLM_F_CREATE);
                self.string(1, TABLE);
                self.string(3, name);
            }
            Command::FlushChain { name } => {
                message(self, NFT_MSG_DELRULE, 0);
                self.string(1, TABLE);
                self.string(2, name);
            }
            Command::DeleteChain { name } => {
                message(self, NFT_MSG_DELCHAIN, 0);
                self.string(1, TABLE);
                self.string(3, name);
            }
            Command::AddRule { chain, rule } => {
                message(self, NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND);
                self.string(1, TABLE);
                self.string(2, chain);
                self.nest(4);
                self.rule(rule);
                self.end();
            }
            Command::AddElements { set, elements } => {
                message(self, NFT_MSG_NEWSETELEM, NLM_F_CREATE);
                self.elements(set, elements.iter().map(|(key, chain)| (key, chain.as_ref())));
            }
            Command::DeleteElements { set, keys } => {
                message(self, NFT_MSG_DELSETELEM, 0);
                self.elements(set, keys.iter().map(|key| (key, None)));
            }
        }
        self.end_message();
    }
}

/// The batch for `commands`: begin, a message each (sequence numbers from `first`; the last
/// asks for an acknowledgement), end.
fn batch(commands: &[Command], first: u32) -> Vec<u8> {
    let mut w = Writer::default();
    let last = first.wrapping_add(u32::try_from(commands.len()).unwrap_or(u32::MAX)).wrapping_sub(1);
    w.message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, first.wrapping_sub(1), 0, NFNL_SUBSYS_NFTABLES);
    w.end_message();
    let mut seq = first;
    for command in commands {
        w.command(command, seq, if seq == last { NLM_F_ACK } else { 0 });
        seq = seq.wrapping_add(1);
    }
    w.message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES);
    w.end_message();
    w.buf
}

/// A netfilter netlink socket, kept for many writes: closing one costs the kernel 15–20 ms
/// (more than a whole change), so the proxy holds one for its life. It belongs to the network
/// namespace of the thread that opened it.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    /// The next batch's first sequence number: answers to earlier batches are told apart.
    seq: u32,
}

impl Socket {
    pub fn open() -> anyhow::Result<Socket> {
        let fd = rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, Some(netlink::NETFILTER))
            .context("opening a netfilter netlink socket")?;
        rustix::net::bind(&fd, &netlink::SocketAddrNetlink::new(0, 0)).context("binding the netlink socket")?;
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(std::time::Duration::from_secs(5)),
        )?;
        Ok(Socket { fd, seq: 1 })
    }

    /// Applies `commands` as one transaction (nothing to do for none). An error names the
    /// first command the kernel refused, as `nft -f` text.
    pub fn write(&mut self, commands: &[Command]) -> anyhow::Result<()> {
        if commands.is_empty() {
            return Ok(());
        }
        let first = self.seq;
        self.seq = self.seq.wrapping_add(u32::try_from(commands.len()).unwrap_or(u32::MAX)).wrapping_add(2);
        write(&self.fd, commands, first)
    }
}

fn write(fd: &OwnedFd, commands: &[Command], first: u32) -> anyhow::Result<()> {
    let message = batch(commands, first);
    // The whole batch goes in one send, so the socket must take it: root may raise the limit.
    if message.len() > 128 * 1024 {
        rustix::net::sockopt::set_socket_send_buffer_size_force(fd, message.len() + 64 * 1024)
            .context("raising the netlink send buffer")?;
    }
    let sent = rustix::net::send(fd, &message, SendFlags::empty()).context("sending the nftables batch")?;
    anyhow::ensure!(sent == message.len(), "the nftables batch was sent in part");
    // The kernel handles the batch while sending: its answers (an error per refused message,
    // the last message's acknowledgement) are queued by now.
    let count = u32::try_from(commands.len()).unwrap_or(u32::MAX);
    let last = first.wrapping_add(count).wrapping_sub(1);
    let ours = |seq: u32| seq.wrapping_sub(first.wrapping_sub(1)) <= count.saturating_add(1);
    let mut errors: HashMap<u32, i32> = HashMap::new();
    let mut acknowledged = false;
    let mut buf = vec![0u8; 64 * 1024];
    let mut flags = RecvFlags::empty();
    loop {
        let length = match rustix::net::recv(fd, &mut buf[..], flags) {
            Ok((_, length)) => length,
            Err(rustix::io::Errno::AGAIN) if acknowledged || !errors.is_empty() => break,
            Err(error) => return Err(error).context("reading the kernel's answer to the nftables batch"),
        };
        for (kind, seq, payload) in messages(&buf[..length.min(buf.len())]) {
            if kind != NLMSG_ERROR || payload.len() < 4 {
                continue;
            }
            let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
            if !ours(seq) {
                continue;
            }
            if code != 0 {
                errors.entry(seq).or_insert(code);
            } else if seq == last {
                acknowledged = true;
            }
        }
        // Whatever else is queued, without waiting.
        flags = RecvFlags::DONTWAIT;
    }
    if let Some((&seq, &code)) = errors.iter().min_by_key(|(seq, _)| seq.wrapping_sub(first.wrapping_sub(1))) {
        let error = std::io::Error::from_raw_os_error(-code);
        match commands.get(seq.wrapping_sub(first) as usize) {
            Some(command) => bail!("nftables refused `{command}`: {error}"),
            None => bail!("nftables refused the batch: {error}"),
        }
    }
    Ok(())
}

/// The netlink messages in `buf`: (type, sequence number, payload).
fn messages(mut buf: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let length = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if length < 16 || length > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
        out.push((kind, seq, &buf[16..length]));
        buf = &buf[length.next_multiple_of(4).min(buf.len())..];
    }
    out
}
