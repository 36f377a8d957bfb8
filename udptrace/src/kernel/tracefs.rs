//! Tracepoint event formats from tracefs, so programs read tracepoint fields at the
//! offsets this kernel uses.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted (looked in /sys/kernel/tracing and /sys/kernel/debug/tracing): \
         mount it with `mount -t tracefs nodev /sys/kernel/tracing`"
    )]
    NotMounted,
    #[error("tracepoint {0} does not exist on this kernel")]
    NoTracepoint(String),
    #[error("tracepoint {tracepoint} has no field {field}")]
    NoField { tracepoint: String, field: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One field of a tracepoint's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// The record layout of one tracepoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Format {
    pub name: String,
    pub fields: HashMap<String, Field>,
}

impl Format {
    /// Parses the text of an `events/<category>/<name>/format` file.
    pub fn parse(name: &str, text: &str) -> Self {
        let fields = text
            .lines()
            .filter_map(|line| {
                let line = line.trim().strip_prefix("field:")?;
                let mut parts = line.split(';').map(str::trim);
                let decl = parts.next()?;
                let mut offset = None;
                let mut size = None;
                for part in parts {
                    if let Some(v) = part.strip_prefix("offset:") {
                        offset = v.parse().ok();
                    } else if let Some(v) = part.strip_prefix("size:") {
                        size = v.parse().ok();
                    }
                }
                // "struct sockaddr * addr" / "__u8 saddr[4]": the name is the last word,
                // without any array suffix.
                let field = decl.rsplit([' ', '*']).next()?.split('[').next()?;
                Some((
                    field.to_string(),
                    Field {
                        offset: offset?,
                        size: size?,
                    },
                ))
            })
            .collect();
        Self {
            name: name.into(),
            fields,
        }
    }

    /// Offset of `field`, or an error naming it.
    pub fn offset(&self, field: &str) -> Result<u32, TracefsError> {
        self.fields
            .get(field)
            .map(|f| f.offset)
            .ok_or_else(|| TracefsError::NoField {
                tracepoint: self.name.clone(),
                field: field.into(),
            })
    }
}

/// A mounted tracefs.
pub struct Tracefs {
    root: PathBuf,
}

impl Tracefs {
    /// Finds tracefs where kernels and distributions mount it.
    pub fn find() -> Result<Self, TracefsError> {
        ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.join("events").is_dir())
            .map(|p| Self { root: p.into() })
            .ok_or(TracefsError::NotMounted)
    }

    /// Finds tracefs, mounting it at /sys/kernel/tracing when nothing has (as systemd
    /// would at boot). Returns whether this call mounted it.
    pub fn find_or_mount() -> Result<(Self, bool), TracefsError> {
        if let Ok(fs) = Self::find() {
            return Ok((fs, false));
        }
        let target = c"/sys/kernel/tracing";
        // SAFETY: plain mount(2) with NUL-terminated strings and no data.
        let rc = unsafe {
            libc::mount(
                c"nodev".as_ptr(),
                target.as_ptr(),
                c"tracefs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            tracing::debug!("mounting tracefs: {}", std::io::Error::last_os_error());
            return Err(TracefsError::NotMounted);
        }
        Self::find().map(|fs| (fs, true))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn exists(&self, category: &str, name: &str) -> bool {
        self.root.join("events").join(category).join(name).is_dir()
    }

    /// The format of tracepoint `category:name`.
    pub fn format(&self, category: &str, name: &str) -> Result<Format, TracefsError> {
        let full = format!("{category}:{name}");
        if !self.exists(category, name) {
            return Err(TracefsError::NoTracepoint(full));
        }
        let path = self
            .root
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        let text = fs::read_to_string(&path).map_err(|source| TracefsError::Io { path, source })?;
        Ok(Format::parse(&full, &text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SENDTO: &str = "name: sys_enter_sendto
ID: 2224
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:int fd;\toffset:16;\tsize:8;\tsigned:0;
\tfield:struct sockaddr * addr;\toffset:48;\tsize:8;\tsigned:0;
\tfield:int addr_len;\toffset:56;\tsize:8;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:60;\tsize:4;\tsigned:0;

print fmt: \"fd: 0x%08lx\", ((unsigned long)(REC->fd))
";

    #[test]
    fn parses_fields_pointers_and_arrays() {
        let f = Format::parse("syscalls:sys_enter_sendto", SENDTO);
        assert_eq!(f.offset("addr").unwrap(), 48);
        assert_eq!(f.offset("addr_len").unwrap(), 56);
        assert_eq!(
            f.fields["saddr"],
            Field {
                offset: 60,
                size: 4
            }
        );
        assert_eq!(f.fields["common_type"], Field { offset: 0, size: 2 });
        assert_eq!(f.fields.len(), 6);
    }

    #[test]
    fn missing_field_is_named() {
        let f = Format::parse("syscalls:sys_enter_sendto", SENDTO);
        assert_eq!(
            f.offset("msg").unwrap_err().to_string(),
            "tracepoint syscalls:sys_enter_sendto has no field msg"
        );
    }
}
