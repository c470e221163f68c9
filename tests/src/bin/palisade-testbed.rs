//! The workload processes of the test world.
//!
//! `palisade-testbed serve --tcp 443,8080 --udp 53 [--count FILE]` answers
//! every TCP connection and UDP datagram with `pong` (and keeps how many it
//! accepted and received in FILE). `palisade-testbed probe tcp|udp
//! ADDR PORT [--timeout-ms N]` tries once and prints one word, with the same
//! word as its exit status: `ok` (0), `eperm` (2: refused by the local
//! kernel, as Palisade's egress hook does), `refused` (3), `timeout` (4),
//! `error` (5). `palisade-testbed flood ADDR PORT COUNT` tries COUNT TCP
//! connects back to back and prints how many failed with EPERM.
//! `palisade-testbed udp-spray ADDR COUNT` sends COUNT datagrams from one
//! socket to distinct ports of ADDR (1024 upwards) and prints `sent N eperm N`.
//! `palisade-testbed udp-session ADDR PORT FILE` keeps one connected UDP
//! socket talking to ADDR:PORT (a `ping` every 20 ms, each answer awaited
//! up to 1 s) and keeps `answered lost` in FILE, until killed.
//! `palisade-testbed attack TECHNIQUE ARGS… [--nobody]` tries one bypass
//! (see `palisade_tests::attack`) and prints `sent`, `eperm` or `error …`;
//! `burst ADDR PORT MS` tries a TCP connect every millisecond for MS ms and
//! prints `ok N eperm N other N`.
//! `bench-serve` and `bench-client` are the benchmark's echo server and load
//! generator.
use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

fn usage() -> ! {
    eprintln!(
        "usage: palisade-testbed serve [--tcp P,P..] [--udp P,P..] [--sctp P,P..] [--count FILE] | probe tcp|udp|sctp ADDR PORT [--timeout-ms N] | flood ADDR PORT COUNT | udp-spray ADDR COUNT | udp-session ADDR PORT FILE | attack raw-udp|raw-udp-hdrincl|raw-syn|raw-tcp-data|raw-tcp-rst|lsrr|rthdr|broadcast|bound-udp|deep-ipv6-udp|packet-socket|ping|ping-reply|udplite ARGS [--nobody] | burst ADDR PORT MS [--timeout-ms N] | sink PORT FILE | stream ADDR PORT [--chunk BYTES] | foreign-socket CGROUP_PROCS | bench-serve [--tcp P] [--udp P] | bench-client crr|rr|udp ADDR PORT CLIENTS MS"
    );
    std::process::exit(64);
}

fn ports(list: &str) -> Vec<u16> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or_else(|_| usage()))
        .collect()
}

/// Connections accepted and datagrams received so far, kept in a file
/// (`serve --count FILE`): what a listener saw, counted where it arrives.
struct Arrivals {
    file: Option<String>,
    count: std::sync::atomic::AtomicU64,
    write: std::sync::Mutex<()>,
}

impl Arrivals {
    fn one(&self) {
        let n = self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if let Some(file) = &self.file {
            let _guard = self.write.lock();
            let tmp = format!("{file}.tmp");
            if std::fs::write(&tmp, format!("{n}\n")).is_ok() {
                let _ = std::fs::rename(&tmp, file);
            }
        }
    }
}

fn serve(args: &[String]) {
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    let mut sctp = Vec::new();
    let mut file = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tcp" => tcp = ports(it.next().unwrap_or_else(|| usage())),
            "--sctp" => sctp = ports(it.next().unwrap_or_else(|| usage())),
            "--udp" => udp = ports(it.next().unwrap_or_else(|| usage())),
            "--count" => file = Some(it.next().unwrap_or_else(|| usage()).clone()),
            _ => usage(),
        }
    }
    let arrivals = std::sync::Arc::new(Arrivals {
        file,
        count: 0.into(),
        write: std::sync::Mutex::new(()),
    });
    let mut threads = Vec::new();
    let listeners = tcp.into_iter().map(|port| {
        // `[::]` accepts IPv4 too (v4-mapped), so one socket serves both families.
        let listener = TcpListener::bind(("::", port)).unwrap_or_else(|e| {
            eprintln!("bind tcp {port}: {e}");
            std::process::exit(1)
        });
        (port, listener)
    });
    let sctp_listeners = sctp.into_iter().map(|port| {
        let listener = sctp_listen(port).unwrap_or_else(|e| {
            eprintln!("listen sctp {port}: {e}");
            std::process::exit(1)
        });
        (port, listener)
    });
    for (_, listener) in listeners.chain(sctp_listeners) {
        let arrivals = arrivals.clone();
        threads.push(std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                arrivals.one();
                let mut buf = [0u8; 64];
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(b"pong");
            }
        }));
    }
    for port in udp {
        let socket = UdpSocket::bind(("::", port)).unwrap_or_else(|e| {
            eprintln!("bind udp {port}: {e}");
            std::process::exit(1)
        });
        let arrivals = arrivals.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((_, from)) = socket.recv_from(&mut buf) {
                arrivals.one();
                let _ = socket.send_to(b"pong", from);
            }
        }));
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    // Park forever (the test world kills us by pid).
    loop {
        std::thread::park();
    }
}

enum Outcome {
    Ok,
    Eperm,
    Refused,
    Timeout,
    Error(String),
}

fn classify(e: &std::io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::PermissionDenied => Outcome::Eperm,
        ErrorKind::ConnectionRefused => Outcome::Refused,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Outcome::Timeout,
        _ if e.raw_os_error() == Some(libc::EPERM) => Outcome::Eperm,
        _ => Outcome::Error(e.to_string()),
    }
}

fn probe_tcp(addr: SocketAddr, timeout: Duration) -> Outcome {
    probe_stream(TcpStream::connect_timeout(&addr, timeout), timeout)
}

/// The TCP probe's exchange over an SCTP association (a one-to-one SCTP
/// socket reads and writes like a TCP stream).
fn probe_sctp(addr: SocketAddr, timeout: Duration) -> Outcome {
    probe_stream(sctp_connect(addr, timeout), timeout)
}

const IPPROTO_SCTP: libc::c_int = 132;

fn sctp_listen(port: u16) -> std::io::Result<TcpListener> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain syscalls on a descriptor this function owns.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM, IPPROTO_SCTP);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let listener = TcpListener::from_raw_fd(fd);
        let off: libc::c_int = 0;
        libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&raw const off).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let mut addr: libc::sockaddr_in6 = std::mem::zeroed();
        addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        addr.sin6_port = port.to_be();
        if libc::bind(
            fd,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        ) < 0
            || libc::listen(fd, 128) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(listener)
    }
}

/// An SCTP association to `addr` within `timeout`, as a stream.
fn sctp_connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    let (domain, storage, len) = sockaddr(addr);
    // SAFETY: plain syscalls on a descriptor this function owns.
    unsafe {
        let fd = libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK,
            IPPROTO_SCTP,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        if libc::connect(fd, (&raw const storage).cast(), len) < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
            let mut pfd = libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            if libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) == 0 {
                return Err(ErrorKind::TimedOut.into());
            }
            if let Some(e) = stream.take_error()? {
                return Err(e);
            }
        }
        stream.set_nonblocking(false)?;
        Ok(stream)
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::c_int, libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid; the family's view is
    // written within its size.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        match addr {
            SocketAddr::V4(a) => {
                let sin = (&raw mut storage).cast::<libc::sockaddr_in>();
                (*sin).sin_family = libc::AF_INET as libc::sa_family_t;
                (*sin).sin_port = a.port().to_be();
                (*sin).sin_addr.s_addr = u32::from(*a.ip()).to_be();
                let len = std::mem::size_of::<libc::sockaddr_in>();
                (libc::AF_INET, storage, len as libc::socklen_t)
            }
            SocketAddr::V6(a) => {
                let sin6 = (&raw mut storage).cast::<libc::sockaddr_in6>();
                (*sin6).sin6_family = libc::AF_INET6 as libc::sa_family_t;
                (*sin6).sin6_port = a.port().to_be();
                (*sin6).sin6_addr.s6_addr = a.ip().octets();
                let len = std::mem::size_of::<libc::sockaddr_in6>();
                (libc::AF_INET6, storage, len as libc::socklen_t)
            }
        }
    }
}

fn probe_stream(stream: std::io::Result<TcpStream>, timeout: Duration) -> Outcome {
    let mut stream = match stream {
        Ok(s) => s,
        Err(e) => return classify(&e),
    };
    let _ = stream.set_read_timeout(Some(timeout));
    if let Err(e) = stream.write_all(b"ping") {
        return classify(&e);
    }
    let mut buf = [0u8; 4];
    match stream.read_exact(&mut buf) {
        Ok(()) if &buf == b"pong" => Outcome::Ok,
        Ok(()) => Outcome::Error("unexpected reply".into()),
        Err(e) => classify(&e),
    }
}

fn probe_udp(addr: SocketAddr, timeout: Duration) -> Outcome {
    let bind: SocketAddr = match addr.ip() {
        IpAddr::V4(_) => "0.0.0.0:0".parse().unwrap_or_else(|_| usage()),
        IpAddr::V6(_) => "[::]:0".parse().unwrap_or_else(|_| usage()),
    };
    let socket = match UdpSocket::bind(bind) {
        Ok(s) => s,
        Err(e) => return Outcome::Error(e.to_string()),
    };
    let _ = socket.set_read_timeout(Some(timeout));
    // Unconnected send: exercises the sendmsg hooks.
    if let Err(e) = socket.send_to(b"ping", addr) {
        return classify(&e);
    }
    let mut buf = [0u8; 16];
    match socket.recv_from(&mut buf) {
        Ok((4, from)) if &buf[..4] == b"pong" && from.ip() == addr.ip() => Outcome::Ok,
        Ok(_) => Outcome::Error("unexpected reply".into()),
        Err(e) => classify(&e),
    }
}

fn probe(args: &[String]) {
    let [proto, ip, port, rest @ ..] = args else {
        usage()
    };
    let ip: IpAddr = ip.parse().unwrap_or_else(|_| usage());
    let port: u16 = port.parse().unwrap_or_else(|_| usage());
    let timeout = match rest {
        [] => Duration::from_millis(1000),
        [flag, ms] if flag == "--timeout-ms" => {
            Duration::from_millis(ms.parse().unwrap_or_else(|_| usage()))
        }
        _ => usage(),
    };
    let addr = SocketAddr::new(ip, port);
    let outcome = match proto.as_str() {
        "tcp" => probe_tcp(addr, timeout),
        "udp" => probe_udp(addr, timeout),
        "sctp" => probe_sctp(addr, timeout),
        _ => usage(),
    };
    let (word, code) = match outcome {
        Outcome::Ok => ("ok".to_owned(), 0),
        Outcome::Eperm => ("eperm".to_owned(), 2),
        Outcome::Refused => ("refused".to_owned(), 3),
        Outcome::Timeout => ("timeout".to_owned(), 4),
        Outcome::Error(e) => (format!("error {e}"), 5),
    };
    println!("{word}");
    std::process::exit(code);
}

/// Many connects in a row (each refused at once when egress denies them).
fn flood(args: &[String]) {
    let [ip, port, count] = args else { usage() };
    let ip: IpAddr = ip.parse().unwrap_or_else(|_| usage());
    let port: u16 = port.parse().unwrap_or_else(|_| usage());
    let count: u32 = count.parse().unwrap_or_else(|_| usage());
    let addr = SocketAddr::new(ip, port);
    let mut eperm = 0u32;
    for _ in 0..count {
        if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            && matches!(classify(&e), Outcome::Eperm)
        {
            eperm += 1;
        }
    }
    println!("{eperm}");
}

/// One datagram to each of COUNT ports of ADDR, from one socket: as many
/// flows as datagrams.
fn udp_spray(args: &[String]) {
    let [ip, count] = args else { usage() };
    let ip: IpAddr = ip.parse().unwrap_or_else(|_| usage());
    let count: u32 = count.parse().unwrap_or_else(|_| usage());
    let bind = if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let socket = UdpSocket::bind(bind).unwrap_or_else(|e| {
        eprintln!("bind: {e}");
        std::process::exit(5)
    });
    let (mut sent, mut eperm) = (0u32, 0u32);
    for i in 0..count {
        let port = 1024 + u16::try_from(i % 64_000).unwrap_or(0);
        match socket.send_to(b"x", SocketAddr::new(ip, port)) {
            Ok(_) => sent += 1,
            Err(e) if matches!(classify(&e), Outcome::Eperm) => eperm += 1,
            Err(_) => {}
        }
    }
    println!("sent {sent} eperm {eperm}");
}

/// Benchmark server: one thread per connection answering every 8-byte
/// request with 8 bytes, until the client closes.
fn bench_serve(args: &[String]) {
    let (mut tcp, mut udp) = (None, None);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let port: u16 = it
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| usage());
        match flag.as_str() {
            "--tcp" => tcp = Some(port),
            "--udp" => udp = Some(port),
            _ => usage(),
        }
    }
    if tcp.is_none() && udp.is_none() {
        usage();
    }
    let listener = tcp.map(|port| {
        TcpListener::bind(("::", port)).unwrap_or_else(|e| {
            eprintln!("bind tcp {port}: {e}");
            std::process::exit(1)
        })
    });
    let udp = udp.map(|port| {
        UdpSocket::bind(("::", port)).unwrap_or_else(|e| {
            eprintln!("bind udp {port}: {e}");
            std::process::exit(1)
        })
    });
    println!("ready");
    let _ = std::io::stdout().flush();
    let echo_datagrams = move |socket: UdpSocket| {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    };
    let Some(listener) = listener else {
        if let Some(socket) = udp {
            echo_datagrams(socket);
        }
        return;
    };
    if let Some(socket) = udp {
        std::thread::spawn(move || echo_datagrams(socket));
    }
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut stream = stream;
            let _ = stream.set_nodelay(true);
            let mut buf = [0u8; 8];
            while stream.read_exact(&mut buf).is_ok() {
                if stream.write_all(&buf).is_err() {
                    break;
                }
            }
        });
    }
}

/// Benchmark client: `crr` (connect, one 8-byte request/response, close),
/// `rr` (request/response on one connection per client) or `udp` (8-byte
/// datagram and its echo with `sendto()` on an unconnected socket, a fresh
/// socket every 100 exchanges, so both a flow's first datagram and the ones
/// after it are sent), from N threads for D milliseconds. Prints
/// `<transactions> <errors>`.
fn bench_client(args: &[String]) {
    let [mode, ip, port, clients, ms] = args else {
        usage()
    };
    let addr = SocketAddr::new(
        ip.parse().unwrap_or_else(|_| usage()),
        port.parse().unwrap_or_else(|_| usage()),
    );
    let clients: usize = clients.parse().unwrap_or_else(|_| usage());
    let duration = Duration::from_millis(ms.parse().unwrap_or_else(|_| usage()));
    let start = std::time::Instant::now();
    let run: fn(SocketAddr, Duration, std::time::Instant) -> (u64, u64) = match mode.as_str() {
        "crr" => |a, d, s| tcp_load(a, d, s, false),
        "rr" => |a, d, s| tcp_load(a, d, s, true),
        "udp" => udp_load,
        _ => usage(),
    };
    let threads: Vec<_> = (0..clients)
        .map(|_| std::thread::spawn(move || run(addr, duration, start)))
        .collect();
    let (mut done, mut errors) = (0, 0);
    for t in threads {
        let (d, e) = t.join().unwrap_or((0, 1));
        done += d;
        errors += e;
    }
    println!("{done} {errors}");
}

fn tcp_load(
    addr: SocketAddr,
    duration: Duration,
    start: std::time::Instant,
    keep: bool,
) -> (u64, u64) {
    let (mut done, mut errors) = (0u64, 0u64);
    let mut buf = [7u8; 8];
    let transact = |s: &mut TcpStream, buf: &mut [u8; 8]| {
        s.write_all(buf.as_slice())?;
        s.read_exact(buf.as_mut_slice())
    };
    let mut conn: Option<TcpStream> = None;
    while start.elapsed() < duration {
        let mut s = match conn.take() {
            Some(s) => s,
            None => match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    s
                }
                Err(_) => {
                    errors += 1;
                    continue;
                }
            },
        };
        match transact(&mut s, &mut buf) {
            Ok(()) => {
                done += 1;
                if keep {
                    conn = Some(s);
                }
            }
            Err(_) => errors += 1,
        }
    }
    (done, errors)
}

fn udp_load(addr: SocketAddr, duration: Duration, start: std::time::Instant) -> (u64, u64) {
    let (mut done, mut errors) = (0u64, 0u64);
    let local: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut buf = [7u8; 8];
    while start.elapsed() < duration {
        let Ok(socket) = UdpSocket::bind(local) else {
            errors += 1;
            continue;
        };
        let _ = socket.set_read_timeout(Some(Duration::from_millis(200)));
        for _ in 0..100 {
            let ok = socket.send_to(&buf, addr).is_ok() && socket.recv_from(&mut buf).is_ok();
            if ok {
                done += 1;
            } else {
                errors += 1;
            }
            if start.elapsed() >= duration {
                break;
            }
        }
    }
    (done, errors)
}

fn udp_session(args: &[String]) {
    let [addr, port, file] = args else { usage() };
    let ip: IpAddr = addr.parse().unwrap_or_else(|_| usage());
    let port: u16 = port.parse().unwrap_or_else(|_| usage());
    let local = if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let socket = UdpSocket::bind(local).unwrap_or_else(|e| {
        eprintln!("bind: {e}");
        std::process::exit(1)
    });
    if let Err(e) = socket.connect(SocketAddr::new(ip, port)) {
        eprintln!("connect: {e}");
        std::process::exit(2);
    }
    // Generous: a loaded machine must not count a slow answer as lost.
    let _ = socket.set_read_timeout(Some(Duration::from_millis(1000)));
    println!("ready");
    let _ = std::io::stdout().flush();
    let (mut answered, mut lost) = (0u64, 0u64);
    let mut buf = [0u8; 64];
    loop {
        let ok = socket.send(b"ping").is_ok()
            && matches!(socket.recv(&mut buf), Ok(4) if &buf[..4] == b"pong");
        if ok {
            answered += 1;
        } else {
            lost += 1;
        }
        let tmp = format!("{file}.tmp");
        if std::fs::write(&tmp, format!("{answered} {lost}\n")).is_ok() {
            let _ = std::fs::rename(&tmp, file);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn attack(args: &[String]) {
    use palisade_tests::attack as a;
    let nobody = args.iter().any(|x| x == "--nobody");
    let args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|x| *x != "--nobody")
        .collect();
    if nobody && let Err(e) = a::become_nobody() {
        println!("error dropping privileges: {e}");
        std::process::exit(5);
    }
    let v4 = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap_or_else(|_| usage());
    let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap_or_else(|_| usage());
    let port = |s: &str| s.parse::<u16>().unwrap_or_else(|_| usage());
    let ip = |s: &str| s.parse::<IpAddr>().unwrap_or_else(|_| usage());
    let result = match args.as_slice() {
        ["raw-udp", dst, p] => a::raw_udp(v4(dst), port(p), None),
        ["raw-udp-hdrincl", src, dst, p] => a::raw_udp(v4(dst), port(p), Some(v4(src))),
        ["raw-syn", src, dst, p] => a::raw_syn(v4(src), v4(dst), port(p)),
        ["lsrr", allowed, denied, p] => a::lsrr_udp(v4(allowed), v4(denied), port(p)),
        ["rthdr", allowed, denied, p] => a::rthdr_udp(v6(allowed), v6(denied), port(p)),
        ["broadcast", p] => a::broadcast_udp(port(p)),
        ["bound-udp", src, dst, p] => a::bound_udp(v4(src), v4(dst), port(p)),
        ["deep-ipv6-udp", src, dst, p, n] => a::deep_ipv6_udp(
            v6(src),
            v6(dst),
            port(p),
            n.parse().unwrap_or_else(|_| usage()),
        ),
        ["packet-socket"] => a::packet_socket(),
        ["raw-tcp-data", src, dst, p] => {
            a::raw_tcp(v4(src), v4(dst), port(p), a::TCP_PSH_ACK, b"exfiltrated")
        }
        ["raw-tcp-rst", src, dst, p] => a::raw_tcp(v4(src), v4(dst), port(p), a::TCP_RST, b"x"),
        ["ping", dst] => a::ping(ip(dst)).map(drop),
        ["ping-reply", dst] => a::ping_reply(ip(dst), Duration::from_millis(800)),
        ["udplite", dst, p] => a::udplite(ip(dst), port(p)),
        _ => usage(),
    };
    let (word, code) = match result {
        Ok(()) => ("sent".to_owned(), 0),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => ("eperm".to_owned(), 2),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => ("timeout".to_owned(), 3),
        Err(e) => (format!("error {e}"), 5),
    };
    println!("{word}");
    std::process::exit(code);
}

/// Creates a UDP socket and a TCP listener where it starts, then moves
/// itself into the cgroup whose `cgroup.procs` is given, keeping them: a
/// socket handed to a workload from outside.
fn foreign_socket(args: &[String]) {
    let [procs] = args else { usage() };
    let udp = UdpSocket::bind(("::", 0)).unwrap_or_else(|e| {
        eprintln!("bind: {e}");
        std::process::exit(1)
    });
    let tcp = TcpListener::bind(("::", 0)).unwrap_or_else(|e| {
        eprintln!("bind: {e}");
        std::process::exit(1)
    });
    if let Err(e) = std::fs::write(procs, std::process::id().to_string()) {
        eprintln!("joining {procs}: {e}");
        std::process::exit(1);
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    let _keep = (udp, tcp);
    loop {
        std::thread::park();
    }
}

/// A TCP listener on PORT that counts every byte it receives, over all its
/// connections, into FILE: what a peer delivered, counted where it arrives.
fn sink(args: &[String]) {
    let [port, file] = args else { usage() };
    let port: u16 = port.parse().unwrap_or_else(|_| usage());
    let listener = TcpListener::bind(("::", port)).unwrap_or_else(|e| {
        eprintln!("bind tcp {port}: {e}");
        std::process::exit(1)
    });
    let total = std::sync::Arc::new(std::sync::Mutex::new(0u64));
    println!("ready");
    let _ = std::io::stdout().flush();
    for stream in listener.incoming().flatten() {
        let (total, file) = (total.clone(), file.clone());
        std::thread::spawn(move || {
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let Ok(mut t) = total.lock() else { break };
                *t += n as u64;
                let tmp = format!("{file}.tmp");
                if std::fs::write(&tmp, format!("{}\n", *t)).is_ok() {
                    let _ = std::fs::rename(&tmp, &file);
                }
            }
        });
    }
}

/// Connects to ADDR:PORT once, prints `ready`, then writes 64 bytes (or
/// `--chunk` bytes: full-sized segments) every 5 ms on that one connection
/// until killed (a long-lived connection).
fn stream(args: &[String]) {
    let (args, chunk) = match args {
        [rest @ .., flag, n] if flag == "--chunk" => {
            (rest, n.parse::<usize>().unwrap_or_else(|_| usage()))
        }
        _ => (args, 64),
    };
    let [addr, port] = args else { usage() };
    let addr = SocketAddr::new(
        addr.parse().unwrap_or_else(|_| usage()),
        port.parse().unwrap_or_else(|_| usage()),
    );
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap_or_else(|e| {
        eprintln!("connect {addr}: {e}");
        std::process::exit(1)
    });
    println!("ready");
    let _ = std::io::stdout().flush();
    loop {
        if conn.write_all(&vec![0x42; chunk]).is_err() {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// TCP connects to ADDR:PORT every millisecond for MS milliseconds, each
/// given `--timeout-ms` (default 20); prints `ok N eperm N other N`.
fn burst(args: &[String]) {
    let (args, timeout) = match args {
        [rest @ .., flag, ms] if flag == "--timeout-ms" => (
            rest,
            Duration::from_millis(ms.parse().unwrap_or_else(|_| usage())),
        ),
        _ => (args, Duration::from_millis(20)),
    };
    let [addr, port, ms] = args else { usage() };
    let addr = SocketAddr::new(
        addr.parse().unwrap_or_else(|_| usage()),
        port.parse().unwrap_or_else(|_| usage()),
    );
    let ms: u64 = ms.parse().unwrap_or_else(|_| usage());
    let start = std::time::Instant::now();
    let (mut ok, mut eperm, mut other) = (0u32, 0u32, 0u32);
    while start.elapsed() < Duration::from_millis(ms) {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(_) => ok += 1,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
            Err(_) => other += 1,
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("ok {ok} eperm {eperm} other {other}");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench-serve") => bench_serve(&args[1..]),
        Some("bench-client") => bench_client(&args[1..]),
        Some("serve") => serve(&args[1..]),
        Some("flood") => flood(&args[1..]),
        Some("probe") => probe(&args[1..]),
        Some("udp-session") => udp_session(&args[1..]),
        Some("udp-spray") => udp_spray(&args[1..]),
        Some("attack") => attack(&args[1..]),
        Some("burst") => burst(&args[1..]),
        Some("sink") => sink(&args[1..]),
        Some("stream") => stream(&args[1..]),
        Some("foreign-socket") => foreign_socket(&args[1..]),
        _ => usage(),
    }
}
