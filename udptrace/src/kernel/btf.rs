//! Struct layouts from the kernel's BTF (`/sys/kernel/btf/vmlinux`).

use std::{
    cell::RefCell,
    collections::HashMap,
    fs::File,
    os::fd::{FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use btf_rs::{Backend, Btf, Type};
use fallible_iterator::FallibleIterator as _;

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "{path} is missing: this kernel was built without BTF (CONFIG_DEBUG_INFO_BTF=y). \
         udptrace reads kernel struct layouts from it; use a kernel with BTF (most distributions \
         ship one since 2020)"
    )]
    Missing { path: PathBuf },
    #[error("cannot parse {path}: {source}")]
    Parse {
        path: PathBuf,
        source: btf_rs::Error,
    },
    #[error("this kernel's BTF has no struct {0}")]
    NoStruct(String),
    #[error("this kernel's BTF has no enum {0}")]
    NoEnum(String),
    #[error("this kernel's BTF has no tracepoint {0} (typedef btf_trace_{0})")]
    NoTracepoint(String),
    #[error("this kernel's BTF has no field {field} in struct {strukt}")]
    NoField { strukt: String, field: String },
}

/// `path` copied into an anonymous memory file and mapped from there: for kernels whose
/// sysfs refuses to map the BTF file. The copy goes when the mapping does.
fn mapped_copy(path: &Path) -> Result<Btf, btf_rs::Error> {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned at once.
    let fd = unsafe { libc::memfd_create(c"udptrace-btf".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: a new fd nothing else owns.
    let mut copy = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    std::io::copy(&mut File::open(path)?, &mut copy)?;
    Btf::from_file_with_backend(format!("/proc/self/fd/{fd}"), Backend::Mmap)
}

/// The kernel's type information.
pub struct KernelBtf {
    btf: Btf,
    /// Structs and unions found by name so far: each name is looked up once.
    composites: RefCell<HashMap<String, Option<btf_rs::Struct>>>,
}

impl KernelBtf {
    /// Reads the running kernel's BTF.
    pub fn running() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        if !path.exists() {
            return Err(BtfError::Missing { path: path.into() });
        }
        // Mapped and read where asked (a name lookup scans the type section): a few MiB,
        // briefly, where parsing every type up front took ~30 MiB of heap, the agent's
        // whole peak. sysfs maps vmlinux's BTF since 6.16; before, a copy in memory is.
        let btf = Btf::from_file_with_backend(path, Backend::Mmap)
            .or_else(|_| mapped_copy(path))
            .map_err(|source| BtfError::Parse {
                path: path.into(),
                source,
            })?;
        Ok(Self {
            btf,
            composites: RefCell::default(),
        })
    }

    /// A struct (or union) type by name.
    fn composite(&self, name: &str) -> Result<btf_rs::Struct, BtfError> {
        self.composites
            .borrow_mut()
            .entry(name.to_string())
            .or_insert_with(|| {
                self.btf
                    .resolve_types_by_name(name)
                    .unwrap_or_default()
                    .into_iter()
                    .find_map(|t| match t {
                        Type::Struct(s) | Type::Union(s) if !s.members.is_empty() => Some(s),
                        _ => None,
                    })
            })
            .clone()
            .ok_or_else(|| BtfError::NoStruct(name.into()))
    }

    /// Skips typedefs and qualifiers down to a struct or union, if that is what `t` is.
    fn as_composite(&self, mut t: Type) -> Option<btf_rs::Struct> {
        for _ in 0..16 {
            t = match t {
                Type::Struct(s) | Type::Union(s) => return Some(s),
                Type::Typedef(ref x) => self.btf.resolve_chained_type(x).ok()?,
                Type::Const(ref x) | Type::Volatile(ref x) | Type::Restrict(ref x) => {
                    self.btf.resolve_chained_type(x).ok()?
                }
                Type::TypeTag(ref x) => self.btf.resolve_chained_type(x).ok()?,
                _ => return None,
            };
        }
        None
    }

    /// Finds member `name` in `s`, looking inside anonymous structs and unions.
    /// Returns its byte offset from the start of `s` and its type.
    fn member(&self, s: &btf_rs::Struct, name: &str) -> Option<(u32, Type)> {
        for m in &s.members {
            let offset = m.bit_offset() / 8;
            let member_name = self.btf.resolve_name(m).unwrap_or_default();
            if member_name == name {
                return Some((offset, self.btf.resolve_chained_type(m).ok()?));
            }
            if member_name.is_empty() {
                let inner = self.as_composite(self.btf.resolve_chained_type(m).ok()?)?;
                if let Some((inner_off, t)) = self.member(&inner, name) {
                    return Some((offset + inner_off, t));
                }
            }
        }
        None
    }

    /// Bit offset of member `name` (a bitfield too) inside struct `strukt`.
    pub fn bit_offset_of(&self, strukt: &str, name: &str) -> Result<u32, BtfError> {
        let s = self.composite(strukt)?;
        s.members
            .iter()
            .find(|m| self.btf.resolve_name(*m).unwrap_or_default() == name)
            .map(btf_rs::Member::bit_offset)
            .ok_or_else(|| BtfError::NoField {
                strukt: strukt.into(),
                field: name.into(),
            })
    }

    /// The value of enumerator `name`, in whichever enum (named or not) declares it.
    pub fn enumerator(&self, name: &str) -> Option<u64> {
        let named = |m: &dyn btf_rs::BtfType| self.btf.resolve_name(m).unwrap_or_default();
        let found = self.btf.type_iter().find_map(|t| {
            Ok(match t {
                Type::Enum(e) => e
                    .members
                    .iter()
                    .find(|m| named(*m) == name)
                    .map(|m| u64::from(m.val())),
                Type::Enum64(e) => e
                    .members
                    .iter()
                    .find(|m| named(*m) == name)
                    .map(|m| m.val()),
                _ => None,
            })
        });
        found.ok().flatten()
    }

    /// Byte offset of `path` (member names, outermost first) inside struct `strukt`.
    pub fn offset_of(&self, strukt: &str, path: &[&str]) -> Result<u32, BtfError> {
        let no_field = || BtfError::NoField {
            strukt: strukt.into(),
            field: path.join("."),
        };
        let mut current = self.composite(strukt)?;
        let mut total = 0;
        for (i, name) in path.iter().enumerate() {
            let (offset, t) = self.member(&current, name).ok_or_else(no_field)?;
            total += offset;
            if i + 1 < path.len() {
                current = self.as_composite(t).ok_or_else(no_field)?;
            }
        }
        Ok(total)
    }

    /// Names and values of enum `name`.
    pub fn enum_values(&self, name: &str) -> Result<Vec<(String, u64)>, BtfError> {
        let types = self.btf.resolve_types_by_name(name).unwrap_or_default();
        let named = |m: &dyn btf_rs::BtfType| self.btf.resolve_name(m).unwrap_or_default();
        for t in types {
            match t {
                Type::Enum(e) => {
                    return Ok(e
                        .members
                        .iter()
                        .map(|m| (named(m), u64::from(m.val())))
                        .collect());
                }
                Type::Enum64(e) => {
                    return Ok(e.members.iter().map(|m| (named(m), m.val())).collect())
                }
                _ => {}
            }
        }
        Err(BtfError::NoEnum(name.into()))
    }

    /// The C types of tracepoint `tp`'s arguments, its `TP_PROTO`, as a raw tracepoint
    /// program receives them (`struct sk_buff *`, `enum skb_drop_reason`, `int`...).
    pub fn tracepoint_args(&self, tp: &str) -> Result<Vec<String>, BtfError> {
        let missing = || BtfError::NoTracepoint(tp.into());
        // typedef void (*btf_trace_<tp>)(void *ctx, <TP_PROTO>);
        let typedef = self
            .btf
            .resolve_types_by_name(&format!("btf_trace_{tp}"))
            .unwrap_or_default()
            .into_iter()
            .find_map(|t| match t {
                Type::Typedef(t) => Some(t),
                _ => None,
            })
            .ok_or_else(missing)?;
        let Ok(Type::Ptr(ptr)) = self.btf.resolve_chained_type(&typedef) else {
            return Err(missing());
        };
        let Ok(Type::FuncProto(proto)) = self.btf.resolve_chained_type(&ptr) else {
            return Err(missing());
        };
        Ok(proto
            .parameters
            .iter()
            .skip(1)
            .map(|p| self.type_name(self.btf.resolve_chained_type(p).ok(), 0))
            .collect())
    }

    /// How C spells `t`, qualifiers left out.
    fn type_name(&self, t: Option<Type>, depth: usize) -> String {
        let named = |kind: &str, t: &dyn btf_rs::BtfType| {
            let name = self.btf.resolve_name(t).unwrap_or_default();
            format!("{kind}{name}")
        };
        let inner = |t: &dyn btf_rs::BtfType| {
            if depth > 8 {
                return "?".to_string();
            }
            self.type_name(self.btf.resolve_chained_type(t).ok(), depth + 1)
        };
        match t {
            None | Some(Type::Void) => "void".into(),
            Some(Type::Ptr(p)) => format!("{} *", inner(&p)),
            Some(Type::Const(x)) | Some(Type::Volatile(x)) | Some(Type::Restrict(x)) => inner(&x),
            Some(Type::TypeTag(x)) => inner(&x),
            Some(Type::Struct(s)) => named("struct ", &s),
            Some(Type::Union(s)) => named("union ", &s),
            Some(Type::Enum(e)) => named("enum ", &e),
            Some(Type::Enum64(e)) => named("enum ", &e),
            Some(Type::Int(i)) => named("", &i),
            Some(Type::Typedef(t)) => named("", &t),
            Some(other) => other.name().to_string(),
        }
    }

    /// `sizeof(struct strukt)`.
    pub fn size_of(&self, strukt: &str) -> Result<u32, BtfError> {
        Ok(self.composite(strukt)?.size() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running() -> Option<KernelBtf> {
        Path::new(VMLINUX_BTF)
            .exists()
            .then(|| KernelBtf::running().expect("parse vmlinux BTF"))
    }

    /// The copy mapped from memory (kernels before 6.16) reads the same as the file.
    #[test]
    fn a_mapped_copy_reads_as_the_file_does() {
        let Some(btf) = running() else {
            eprintln!("skipped: {VMLINUX_BTF} missing");
            return;
        };
        let copy = KernelBtf {
            btf: mapped_copy(Path::new(VMLINUX_BTF)).expect("mapped copy"),
            composites: RefCell::default(),
        };
        for (strukt, path) in [
            ("sock", &["__sk_common", "skc_num"][..]),
            ("sk_buff", &["len"][..]),
        ] {
            assert_eq!(
                copy.offset_of(strukt, path).unwrap(),
                btf.offset_of(strukt, path).unwrap()
            );
        }
        assert_eq!(
            copy.enum_values("skb_drop_reason").unwrap(),
            btf.enum_values("skb_drop_reason").unwrap()
        );
    }

    #[test]
    fn finds_fields_inside_anonymous_unions() {
        let Some(btf) = running() else {
            eprintln!("skipped: {VMLINUX_BTF} missing");
            return;
        };
        // skc_daddr sits in an anonymous union in an anonymous struct at the very start of
        // sock_common on every kernel since 2.6; skc_num follows the address pair.
        assert_eq!(
            btf.offset_of("sock", &["__sk_common", "skc_daddr"])
                .unwrap(),
            0
        );
        assert_eq!(
            btf.offset_of("sock", &["__sk_common", "skc_rcv_saddr"])
                .unwrap(),
            4
        );
        assert_eq!(
            btf.offset_of("sock", &["__sk_common", "skc_dport"])
                .unwrap(),
            12
        );
        assert_eq!(
            btf.offset_of("sock", &["__sk_common", "skc_num"]).unwrap(),
            14
        );
        assert_eq!(btf.offset_of("sock_common", &["skc_family"]).unwrap(), 16);
        // struct msghdr starts with msg_name.
        assert_eq!(btf.offset_of("msghdr", &["msg_name"]).unwrap(), 0);
        assert_eq!(btf.size_of("mmsghdr").unwrap(), 64);
    }

    #[test]
    fn spells_tracepoint_arguments_as_c_does() {
        let Some(btf) = running() else {
            eprintln!("skipped: {VMLINUX_BTF} missing");
            return;
        };
        assert_eq!(
            btf.tracepoint_args("net_dev_start_xmit").unwrap(),
            ["struct sk_buff *", "struct net_device *"]
        );
        let kfree = btf.tracepoint_args("kfree_skb").unwrap();
        assert_eq!(
            kfree[..3],
            ["struct sk_buff *", "void *", "enum skb_drop_reason"]
        );
        assert_eq!(
            btf.tracepoint_args("no_such_tracepoint_udptrace")
                .unwrap_err()
                .to_string(),
            "this kernel's BTF has no tracepoint no_such_tracepoint_udptrace \
             (typedef btf_trace_no_such_tracepoint_udptrace)"
        );
    }

    #[test]
    fn names_what_is_missing() {
        let Some(btf) = running() else {
            eprintln!("skipped: {VMLINUX_BTF} missing");
            return;
        };
        let err = btf
            .offset_of("sock", &["__sk_common", "no_such_field"])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "this kernel's BTF has no field __sk_common.no_such_field in struct sock"
        );
        let err = btf.size_of("no_such_struct_udptrace").unwrap_err();
        assert!(
            err.to_string()
                .contains("no struct no_such_struct_udptrace"),
            "{err}"
        );
    }

    #[test]
    fn missing_file_says_what_to_do() {
        let err = KernelBtf::from_file(Path::new("/nonexistent/vmlinux"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
    }
}
