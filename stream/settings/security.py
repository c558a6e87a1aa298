"""Credentials and TLS for Kafka and Redis, translated once from :class:`WorkerSettings`.

Three clients talk to Kafka — the Faust worker, ``replay`` and ``tail`` (plain aiokafka) —
and they take the same facts in different shapes: Faust wants ``broker_credentials``
(:class:`faust.SASLCredentials` / :class:`faust.SSLCredentials`), aiokafka wants
``security_protocol``/``sasl_*``/``ssl_context`` keyword arguments. :class:`KafkaSecurity`
holds the facts and renders both, so the two cannot drift apart. Redis takes keyword
arguments of redis-py (:func:`redis_client_kwargs`) on top of whatever the URL carries
(``redis://user:pass@host``, ``rediss://`` for TLS).

Secrets stay :class:`~pydantic.SecretStr` until the moment a client is built, and
:func:`~stream.settings.redaction.redact_url` masks a password inside a URL before it goes
into a message.

>>> KafkaSecurity().aiokafka_kwargs()
{'security_protocol': 'PLAINTEXT'}
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from stream.settings.worker import KafkaProtocol, SaslMechanism
from trendcast.exceptions import ConfigError

if TYPE_CHECKING:
    from stream.settings.worker import WorkerSettings

__all__ = ["KafkaSecurity", "redis_client_kwargs"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KafkaSecurity:
    """How to authenticate to and encrypt the traffic with Kafka.

    The default is PLAINTEXT, which is what every existing caller (and Tansu) uses.

    Attributes:
        protocol: ``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``.
        sasl_mechanism: ``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``.
        username: SASL user.
        password: SASL password.
        cafile: CA bundle for the brokers' certificates (system CAs when None).
        certfile: Client certificate for mutual TLS.
        keyfile: Its private key, when not inside ``certfile``.
        keyfile_password: Password of an encrypted ``keyfile``.
        check_hostname: Verify that the certificate names the broker host.
    """

    protocol: KafkaProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism = "PLAIN"
    username: str | None = None
    password: SecretStr | None = None
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    keyfile_password: SecretStr | None = None
    check_hostname: bool = True

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> KafkaSecurity:
        """The Kafka security described by ``TRENDCAST_KAFKA_SECURITY_PROTOCOL`` and friends."""
        return cls(
            protocol=settings.kafka_security_protocol,
            sasl_mechanism=settings.kafka_sasl_mechanism,
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password,
            cafile=settings.kafka_ssl_cafile,
            certfile=settings.kafka_ssl_certfile,
            keyfile=settings.kafka_ssl_keyfile,
            keyfile_password=settings.kafka_ssl_keyfile_password,
            check_hostname=settings.kafka_ssl_check_hostname,
        )

    @property
    def uses_sasl(self) -> bool:
        """SASL authentication is on."""
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def uses_tls(self) -> bool:
        """The connection is encrypted."""
        return self.protocol in ("SSL", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client TLS context for ``SSL``/``SASL_SSL`` (None otherwise).

        Raises:
            ConfigError: A CA, certificate or key file is missing or unreadable.
        """
        if not self.uses_tls:
            return None
        try:
            context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH,
                cafile=str(self.cafile) if self.cafile is not None else None,
            )
            context.check_hostname = self.check_hostname
            if self.certfile is not None:
                context.load_cert_chain(
                    str(self.certfile),
                    keyfile=str(self.keyfile) if self.keyfile is not None else None,
                    password=(
                        self.keyfile_password.get_secret_value()
                        if self.keyfile_password is not None
                        else None
                    ),
                )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the Kafka TLS files: {exc}") from exc
        return context

    def _sasl(self) -> tuple[str, str]:
        if not self.username or self.password is None:
            raise ConfigError(
                f"expected TRENDCAST_KAFKA_SASL_USERNAME and TRENDCAST_KAFKA_SASL_PASSWORD "
                f"with {self.protocol}, got none"
            )
        return self.username, self.password.get_secret_value()

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``AIOKafkaConsumer`` / ``AIOKafkaProducer`` / the admin client.

        aiokafka reads ``sasl_plain_username``/``sasl_plain_password`` for SCRAM too.
        """
        kwargs: dict[str, Any] = {"security_protocol": self.protocol}
        if self.uses_sasl:
            username, password = self._sasl()
            kwargs.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=username,
                sasl_plain_password=password,
            )
        context = self.ssl_context()
        if context is not None:
            kwargs["ssl_context"] = context
        return kwargs

    def faust_credentials(self) -> Any:
        """The ``broker_credentials`` of ``faust.App`` (None for PLAINTEXT).

        Faust turns them into the same aiokafka arguments as :meth:`aiokafka_kwargs`
        (``faust.transport.drivers.aiokafka.credentials_to_aiokafka_auth``): SASL with a
        TLS context becomes ``SASL_SSL``, without one ``SASL_PLAINTEXT``.
        """
        import faust

        if self.uses_sasl:
            username, password = self._sasl()
            return faust.SASLCredentials(
                username=username,
                password=password,
                mechanism=self.sasl_mechanism,
                ssl_context=self.ssl_context(),
            )
        context = self.ssl_context()
        if context is not None:
            return faust.SSLCredentials(context)
        return None


def redis_client_kwargs(settings: WorkerSettings) -> dict[str, Any]:
    """redis-py keyword arguments for the credentials and TLS files in ``settings``.

    Only what is set is returned, so credentials in the URL keep working; redis-py lets the
    URL win over keyword arguments, which is why settings refuse a password in both places.
    TLS itself is switched on by the ``rediss://`` scheme; these add the CA, the client
    certificate and hostname checking.
    """
    kwargs: dict[str, Any] = {}
    if settings.redis_username is not None:
        kwargs["username"] = settings.redis_username
    if settings.redis_password is not None:
        kwargs["password"] = settings.redis_password.get_secret_value()
    if settings.redis_url.startswith("rediss://"):
        kwargs["ssl_check_hostname"] = settings.redis_ssl_check_hostname
        if settings.redis_ssl_ca_certs is not None:
            kwargs["ssl_ca_certs"] = str(settings.redis_ssl_ca_certs)
        if settings.redis_ssl_certfile is not None:
            kwargs["ssl_certfile"] = str(settings.redis_ssl_certfile)
        if settings.redis_ssl_keyfile is not None:
            kwargs["ssl_keyfile"] = str(settings.redis_ssl_keyfile)
    return kwargs
