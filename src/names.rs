//! The one way a config enum gets its names: [`named_enum!`] writes `ALL`, `name()` and
//! `FromStr` from a single list of `Variant => "name"` pairs, so the names used in configs,
//! metrics and command lines cannot drift apart from each other.

/// Generates, for a fieldless enum, from one list of `Variant => "snake_name"` pairs:
///
/// - `ALL`: every variant, in the order listed;
/// - `name()`: the snake_case name (the one its serde `rename_all = "snake_case"` gives it:
///   keep the two in agreement);
/// - `FromStr`: the name, the name with dashes for underscores (`"p-grpo"`), and an optional
///   `alias "other" => Variant`; anything else is [`Error::InvalidConfig`](crate::Error)
///   naming `field`, with the reason `unknown <noun> "x"; expected one of a, b, c`, where the
///   noun is `value` unless given as `noun "estimator"`.
///
/// ```text
/// named_enum!(RatioLevel, "ratio_level", [Token => "token", Sequence => "sequence"]);
/// named_enum!(Estimator, "estimator", noun "estimator", [Grpo => "grpo", PGrpo => "p_grpo"]);
/// ```
macro_rules! named_enum {
    (
        $ty:ident, $field:literal, noun $noun:literal,
        [$($variant:ident => $name:literal),+ $(,)?]
        $(, alias $alias:literal => $target:ident)?
    ) => {
        impl $ty {
            /// Every variant, in declaration order.
            pub const ALL: [$ty; [$($name),+].len()] = [$($ty::$variant),+];

            /// The snake_case name used in configs and metrics.
            pub fn name(&self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = $crate::Error;
            fn from_str(s: &str) -> $crate::Result<Self> {
                $(if s == $alias {
                    return Ok($ty::$target);
                })?
                $ty::ALL
                    .into_iter()
                    .find(|v| v.name() == s || v.name().replace('_', "-") == s)
                    .ok_or_else(|| $crate::Error::InvalidConfig {
                        field: $field,
                        reason: format!(
                            concat!("unknown ", $noun, " {:?}; expected one of {}"),
                            s,
                            $ty::ALL.map(|v| v.name()).join(", ")
                        ),
                    })
            }
        }
    };
    (
        $ty:ident, $field:literal,
        [$($variant:ident => $name:literal),+ $(,)?]
        $(, alias $alias:literal => $target:ident)?
    ) => {
        named_enum!(
            $ty, $field, noun "value",
            [$($variant => $name),+]
            $(, alias $alias => $target)?
        );
    };
}

pub(crate) use named_enum;
