//! Error numbers on the wire: Xen's errno values (`xen/errno.h`, the same as
//! Linux on x86). Responses carry `0` or a negative errno.

/// A positive Xen errno value. On the wire it travels negated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(1);
    pub const ENOENT: Errno = Errno(2);
    pub const EIO: Errno = Errno(5);
    pub const E2BIG: Errno = Errno(7);
    pub const EAGAIN: Errno = Errno(11);
    pub const ENOMEM: Errno = Errno(12);
    pub const EFAULT: Errno = Errno(14);
    pub const EBUSY: Errno = Errno(16);
    pub const EEXIST: Errno = Errno(17);
    pub const EINVAL: Errno = Errno(22);
    pub const ENOSPC: Errno = Errno(28);
    pub const ERANGE: Errno = Errno(34);
    pub const ENOSYS: Errno = Errno(38);
    pub const ENODATA: Errno = Errno(61);
    pub const EBADMSG: Errno = Errno(74);
    pub const EOVERFLOW: Errno = Errno(75);
    pub const EOPNOTSUPP: Errno = Errno(95);
    pub const ETIMEDOUT: Errno = Errno(110);

    /// Every named value above, with its Xen name (the conformance check
    /// compares them with `XEN_<name>` from `xen/errno.h`).
    pub const ALL: &'static [(&'static str, Errno)] = &[
        ("EPERM", Self::EPERM),
        ("ENOENT", Self::ENOENT),
        ("EIO", Self::EIO),
        ("E2BIG", Self::E2BIG),
        ("EAGAIN", Self::EAGAIN),
        ("ENOMEM", Self::ENOMEM),
        ("EFAULT", Self::EFAULT),
        ("EBUSY", Self::EBUSY),
        ("EEXIST", Self::EEXIST),
        ("EINVAL", Self::EINVAL),
        ("ENOSPC", Self::ENOSPC),
        ("ERANGE", Self::ERANGE),
        ("ENOSYS", Self::ENOSYS),
        ("ENODATA", Self::ENODATA),
        ("EBADMSG", Self::EBADMSG),
        ("EOVERFLOW", Self::EOVERFLOW),
        ("EOPNOTSUPP", Self::EOPNOTSUPP),
        ("ETIMEDOUT", Self::ETIMEDOUT),
    ];

    /// Largest errno accepted from the wire (as Linux's `MAX_ERRNO`).
    pub const MAX: i32 = 4095;

    /// The wire form: `-errno`.
    pub const fn to_wire(self) -> i32 {
        -self.0
    }

    /// Parse a wire status: `Ok(None)` for 0, `Ok(Some(e))` for `-e` with
    /// `1 <= e <= MAX`, `Err(())` for anything else.
    #[allow(clippy::result_unit_err)]
    pub const fn from_wire(status: i32) -> Result<Option<Errno>, ()> {
        if status == 0 {
            Ok(None)
        } else if status < 0 && status >= -Self::MAX {
            Ok(Some(Errno(-status)))
        } else {
            Err(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_status_round_trip_and_rejects() {
        for (_, e) in Errno::ALL {
            assert_eq!(Errno::from_wire(e.to_wire()), Ok(Some(*e)));
        }
        assert_eq!(Errno::from_wire(0), Ok(None));
        assert_eq!(Errno::from_wire(1), Err(()));
        assert_eq!(Errno::from_wire(-4096), Err(()));
        assert_eq!(Errno::from_wire(i32::MIN), Err(()));
        assert_eq!(Errno::from_wire(-4095), Ok(Some(Errno(4095))));
    }
}
