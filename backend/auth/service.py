"""Identity logic: grants, credential checks, API keys, users. No SQL here, no web framework."""

from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth import repository as repo
from backend.auth.audit import Outcome, record
from backend.auth.credentials import (
    api_key_prefix,
    digest,
    matches,
    new_api_key,
    new_client,
    new_refresh_token,
)
from backend.auth.errors import (
    InvalidClient,
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    InvalidToken,
    MissingScope,
)
from backend.auth.passwords import MIN_PASSWORD_LENGTH, hash_password, verify_password
from backend.auth.principal import CredentialKind, ExternalIdentity, Principal
from backend.auth.revocation import Record, Revocations
from backend.auth.scopes import Scope, grant, parse_scopes
from backend.auth.signing import TokenSigner
from backend.auth.throttle import LoginThrottle
from backend.config import AuthSettings
from backend.core.db import Database
from backend.core.models import (
    ApiKey,
    AuditEvent,
    OAuthClient,
    RefreshToken,
    Tenant,
    User,
    UserKind,
    UserRole,
)
from backend.core.redis import KeySpace
from backend.errors import Conflict, NotFound, RateLimited, ValidationFailed


@dataclass(frozen=True)
class TokenResponse:
    """RFC 6749 section 5.1."""

    access_token: str
    expires_in: int
    scope: str
    refresh_token: str | None = None
    token_type: str = "Bearer"  # noqa: S105 (a token type name, not a secret)

    def as_json(self) -> dict[str, str | int]:
        body: dict[str, str | int] = {
            "access_token": self.access_token,
            "token_type": self.token_type,
            "expires_in": self.expires_in,
            "scope": self.scope,
        }
        if self.refresh_token:
            body["refresh_token"] = self.refresh_token
        return body


@dataclass(frozen=True)
class CreatedApiKey:
    key: ApiKey
    secret: str  # the whole key, shown once


class AuthService:
    def __init__(
        self,
        db: Database,
        signer: TokenSigner,
        redis: Redis,
        keys: KeySpace,
        settings: AuthSettings,
    ) -> None:
        self._db = db
        self.signer = signer
        self._redis = redis
        self._cache_keys = keys.child("auth")
        self._settings = settings
        self._throttle = LoginThrottle(redis, keys.child("login"), settings)
        self.revocations = Revocations(redis, keys, settings, signer.access_ttl_s)

    async def start(self) -> None:
        """Starts delivering revocations to this replica's open sockets and streams."""
        await self.revocations.start()

    async def close(self) -> None:
        await self.revocations.close()

    # -- token endpoint grants ------------------------------------------------------------

    async def password_grant(
        self, tenant_slug: str, email: str, password: str, scope: str | None, ip: str | None
    ) -> TokenResponse:
        await self._throttle_login(tenant_slug, email, ip)
        async with self._db.session() as session:
            tenant = await repo.tenant_by_slug(session, tenant_slug)
        tenant_id = tenant.id if tenant and tenant.is_active else None
        user = None
        if tenant_id is not None:
            async with self._db.session(tenant_id) as session:
                user = await repo.user_by_email(session, email)
        usable = user is not None and user.is_active and user.kind is UserKind.HUMAN
        ok = await verify_password(user.password_hash if usable and user else None, password)
        if not ok or user is None or tenant_id is None:
            async with self._db.session(tenant_id) as session:
                await record(
                    session,
                    "login",
                    Outcome.FAILURE,
                    tenant_id=tenant_id,
                    actor_id=user.id if user else None,
                    ip=ip,
                    email=email,
                )
            raise InvalidGrant("invalid username or password")
        await self._throttle.succeeded(tenant_slug, email, ip)
        scopes = self._scopes_for(user.role, scope)
        family_id = uuid.uuid4()
        async with self._db.session(tenant_id) as session:
            # Disabled while the password was checked: no tokens.
            current = await repo.user_by_id(session, user.id, lock=True)
            if current is None or not current.is_active:
                raise InvalidGrant("invalid username or password")
            refresh = await self._new_refresh(session, user, scopes, family_id=family_id)
            await record(
                session,
                "login",
                Outcome.SUCCESS,
                tenant_id=tenant_id,
                actor_id=user.id,
                ip=ip,
                grant="password",
            )
            tokens = self._tokens(user, scopes, refresh, tenant.plan if tenant else "", family_id)
        return tokens

    async def client_credentials_grant(
        self, client_id: str, client_secret: str, scope: str | None, ip: str | None
    ) -> TokenResponse:
        async with self._db.session() as session:
            tenant_id = await repo.tenant_of(session, "sightline_find_oauth_client", client_id)
        if tenant_id is None:
            raise InvalidClient("unknown client or wrong secret")
        async with self._db.session(tenant_id) as session:
            client = await repo.client_by_id(session, client_id)
            user = await repo.user_by_id(session, client.user_id) if client else None
            if (
                client is None
                or client.revoked_at is not None
                or user is None
                or not user.is_active
                or not matches(client_secret, client.secret_hash)
            ):
                await record(
                    session,
                    "login",
                    Outcome.FAILURE,
                    tenant_id=tenant_id,
                    ip=ip,
                    grant="client_credentials",
                    client_id=client_id,
                )
                raise InvalidClient("unknown client or wrong secret")
            allowed = grant(user.role, frozenset(Scope(s) for s in client.scopes))
            scopes = self._narrow(allowed, scope)
            await record(
                session,
                "login",
                Outcome.SUCCESS,
                tenant_id=tenant_id,
                actor_id=user.id,
                ip=ip,
                grant="client_credentials",
            )
            plan = await repo.plan_of(session, tenant_id)
        return self._tokens(user, scopes, None, plan)

    async def refresh_grant(
        self, refresh_token: str, scope: str | None, ip: str | None
    ) -> TokenResponse:
        token_hash = digest(refresh_token)
        async with self._db.session() as session:
            tenant_id = await repo.tenant_of(session, "sightline_find_refresh_token", token_hash)
        if tenant_id is None:
            raise InvalidGrant("invalid refresh token")
        reused = False
        async with self._db.session(tenant_id) as session:
            row = await repo.refresh_token_by_hash(session, token_hash)
            if row is None:
                raise InvalidGrant("invalid refresh token")
            if row.used_at is not None:
                # A used token presented again: stolen or replayed. Revoke the whole family.
                await repo.revoke_family(session, row.family_id)
                await record(
                    session,
                    "refresh_token.reuse",
                    Outcome.DENIED,
                    tenant_id=tenant_id,
                    actor_id=row.user_id,
                    ip=ip,
                    family=str(row.family_id),
                )
                reused = True
                family_id = row.family_id
            elif row.revoked_at is not None:
                raise InvalidGrant("refresh token revoked")
            elif row.expires_at <= datetime.now(UTC):
                raise InvalidGrant("refresh token expired")
            else:
                user = await repo.user_by_id(session, row.user_id, lock=True)
                if user is None or not user.is_active:
                    raise InvalidGrant("account disabled")
                row.used_at = datetime.now(UTC)
                kept = grant(user.role, frozenset(Scope(s) for s in row.scopes))
                scopes = self._narrow(kept, scope)
                refresh = await self._new_refresh(session, user, scopes, family_id=row.family_id)
                plan = await repo.plan_of(session, tenant_id)
                tokens = self._tokens(user, scopes, refresh, plan, row.family_id)
        if reused:  # committed above: the family stays revoked, and its access tokens end
            await self.revocations.revoke(Record.SESSION, family_id)
            raise InvalidGrant("refresh token was already used; all its sessions are revoked")
        return tokens

    async def external_sign_in(self, identity: ExternalIdentity, ip: str | None) -> TokenResponse:
        """Tokens for a user the OIDC provider vouched for; made at first sign-in if allowed."""
        async with self._db.session() as session:
            tenant = await repo.tenant_by_slug(session, self._settings.oidc_tenant)
        if tenant is None or not tenant.is_active:
            raise InvalidGrant("the OIDC tenant does not exist")
        async with self._db.session(tenant.id) as session:
            user = await repo.user_by_email(session, identity.email)
        if user is None:
            if not self._settings.oidc_default_role:
                raise InvalidGrant("no account for this identity")
            user = await self.create_user(
                tenant_id=tenant.id,
                email=identity.email,
                password=None,
                role=UserRole(self._settings.oidc_default_role),
                display_name=identity.name[:200],
            )
        if not user.is_active or user.kind is not UserKind.HUMAN:
            raise InvalidGrant("account disabled")
        scopes = grant(user.role, None)
        family_id = uuid.uuid4()
        async with self._db.session(tenant.id) as session:
            refresh = await self._new_refresh(session, user, scopes, family_id=family_id)
            await record(
                session,
                "login",
                Outcome.SUCCESS,
                tenant_id=tenant.id,
                actor_id=user.id,
                ip=ip,
                grant="oidc",
                subject=identity.subject,
            )
        return self._tokens(user, scopes, refresh, tenant.plan, family_id)

    async def revoke_refresh(self, refresh_token: str) -> None:
        """Logout: the token's family ends (RFC 7009 semantics: unknown tokens are fine)."""
        token_hash = digest(refresh_token)
        async with self._db.session() as session:
            tenant_id = await repo.tenant_of(session, "sightline_find_refresh_token", token_hash)
        if tenant_id is None:
            return
        async with self._db.session(tenant_id) as session:
            row = await repo.refresh_token_by_hash(session, token_hash)
            if row is None:
                return
            await repo.revoke_family(session, row.family_id)
            await record(
                session, "logout", Outcome.SUCCESS, tenant_id=tenant_id, actor_id=row.user_id
            )
            # Before the commit: with Redis down nothing is revoked and the caller is told to
            # retry, rather than a refresh token revoked while its access tokens live on. (The
            # record refuses the whole family, so no token issued meanwhile escapes it.)
            await self.revocations.revoke(Record.SESSION, row.family_id)

    # -- authenticating requests ------------------------------------------------------------

    async def authenticate(self, credential: str) -> Principal:
        """A bearer access token or an API key (`sl_...`), or raises InvalidToken."""
        credential = credential.strip()
        if credential.lower().startswith("bearer "):
            credential = credential[7:].strip()
        if not credential:
            raise InvalidToken("empty credential")
        if api_key_prefix(credential) is not None:
            return await self._authenticate_api_key(credential)
        await self.signer.refresh_if_unknown(credential, self._db.session)
        claims = self.signer.verify(credential)
        try:
            role = UserRole(claims.role)
        except ValueError:
            raise InvalidToken("invalid token: role") from None
        principal = Principal(
            user_id=claims.subject,
            tenant_id=claims.tenant_id,
            role=role,
            scopes=parse_scopes(claims.scopes),
            credential=CredentialKind.ACCESS_TOKEN,
            expires_at=claims.expires_at,
            plan=claims.plan,
            session_id=claims.session_id,
            issued_at=claims.issued_at,
        )
        if (reason := await self.revocations.check(principal)) is not None:
            raise InvalidToken(reason)
        return principal

    def _api_key_cache(self, secret_hash: bytes) -> str:
        return self._cache_keys("apikey", secret_hash.hex())

    async def _authenticate_api_key(self, key: str) -> Principal:
        ttl = self._settings.api_key_cache_ttl_s
        cache_key = self._api_key_cache(digest(key))
        if ttl and (cached := await self._redis.get(cache_key)) is not None:
            principal = _principal_from_json(cached)
            # A key revoked, or its user disabled, since it was cached: ask the database.
            if (
                principal.expires_at is None or principal.expires_at > time.time()
            ) and await self.revocations.check(principal) is None:
                return principal
        principal = await self._authenticate_api_key_in_db(key)
        if ttl:
            lifetime = (
                ttl
                if principal.expires_at is None
                else min(ttl, int(principal.expires_at - time.time()))
            )
            if lifetime > 0:
                await self._redis.set(cache_key, _principal_to_json(principal), ex=lifetime)
        return principal

    async def _authenticate_api_key_in_db(self, key: str) -> Principal:
        prefix = api_key_prefix(key)
        assert prefix is not None
        # Before the read: a revocation committed after it (and recorded after it) refuses
        # this verification when it is found in the cache.
        verified_at = time.time()
        async with self._db.session() as session:
            tenant_id = await repo.tenant_of(session, "sightline_find_api_key", prefix)
        if tenant_id is None:
            raise InvalidToken("invalid API key")
        async with self._db.session(tenant_id) as session:
            row = await repo.api_key_by_prefix(session, prefix)
            if row is None or not matches(key, row.secret_hash):
                raise InvalidToken("invalid API key")
            now = datetime.now(UTC)
            if row.revoked_at is not None or (row.expires_at and row.expires_at <= now):
                await record(
                    session,
                    "api_key.rejected",
                    Outcome.DENIED,
                    tenant_id=tenant_id,
                    actor_id=row.user_id,
                    key=row.prefix,
                    reason="revoked" if row.revoked_at else "expired",
                )
                rejected = True
            else:
                rejected = False
                user = await repo.user_by_id(session, row.user_id)
                if user is None or not user.is_active:
                    raise InvalidToken("invalid API key")
                plan = await repo.plan_of(session, tenant_id)
                touch_after = timedelta(seconds=self._settings.api_key_touch_interval_s)
                if row.last_used_at is None or now - row.last_used_at > touch_after:
                    await repo.touch_api_key(session, row.id)
        if rejected:
            raise InvalidToken("API key revoked or expired")
        return Principal(
            user_id=row.user_id,
            tenant_id=tenant_id,
            role=user.role,
            scopes=grant(user.role, frozenset(Scope(s) for s in row.scopes)),
            credential=CredentialKind.API_KEY,
            expires_at=row.expires_at.timestamp() if row.expires_at else None,
            api_key_id=row.id,
            plan=plan,
            issued_at=verified_at,
        )

    # -- API keys ---------------------------------------------------------------------------

    async def create_api_key(
        self,
        principal: Principal,
        name: str,
        scopes: list[str] | None,
        expires_in_days: int | None,
    ) -> CreatedApiKey:
        name = name.strip()
        if not 1 <= len(name) <= 100:
            raise ValidationFailed("name must be 1 to 100 characters", field="name")
        if expires_in_days is not None and not 1 <= expires_in_days <= 3650:
            raise ValidationFailed("expiresInDays must be 1 to 3650", field="expiresInDays")
        requested = parse_scopes(scopes) if scopes is not None else principal.scopes
        if scopes is not None and len(requested) != len(set(scopes)):
            raise ValidationFailed("unknown scope", field="scopes")
        if not requested <= principal.scopes:  # a key never holds more than its creator
            raise MissingScope("a key cannot have scopes its creator does not hold")
        secret, prefix = new_api_key()
        expires = datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days else None
        async with self._db.session(principal.tenant_id) as session:
            row = ApiKey(
                tenant_id=principal.tenant_id,
                user_id=principal.user_id,
                name=name,
                prefix=prefix,
                secret_hash=digest(secret),
                scopes=sorted(requested),
                expires_at=expires,
                created_at=datetime.now(UTC),
            )
            session.add(row)
            await session.flush()
            await record(
                session,
                "api_key.created",
                Outcome.SUCCESS,
                tenant_id=principal.tenant_id,
                actor_id=principal.user_id,
                key=prefix,
                scopes=sorted(requested),
            )
        return CreatedApiKey(row, secret)

    async def revoke_api_key(self, principal: Principal, key_id: uuid.UUID) -> ApiKey:
        async with self._db.session(principal.tenant_id) as session:
            keys = await repo.api_keys_of(session, None)
            row = next((k for k in keys if k.id == key_id), None)
            # Another tenant's key is invisible (RLS); another user's needs the admin scope.
            if row is None or (row.user_id != principal.user_id and not principal.has(Scope.ADMIN)):
                raise NotFound("no such API key", id=str(key_id))
            newly = row.revoked_at is None
            if newly:
                row.revoked_at = datetime.now(UTC)
                await record(
                    session,
                    "api_key.revoked",
                    Outcome.SUCCESS,
                    tenant_id=principal.tenant_id,
                    actor_id=principal.user_id,
                    key=row.prefix,
                )
            # Before the commit (with Redis down nothing changes; the caller retries): requests
            # and open streams with the key end on every replica. The cached verification
            # goes after the commit, or a replica reading the key meanwhile would cache it again.
            await self.revocations.revoke(Record.KEY, row.id)
        await self._redis.delete(self._api_key_cache(row.secret_hash))
        return row

    async def forget_cached(
        self, tenant_id: uuid.UUID, emails: list[str], secret_hashes: list[bytes]
    ) -> None:
        """Drops what Redis holds about these users and keys: sign-in throttling state (named
        by a hash of tenant and e-mail) and verified API keys (an erased user's key must not be
        trusted from it)."""
        names = [self._api_key_cache(h) for h in secret_hashes]
        for start in range(0, len(names), 500):
            await self._redis.delete(*names[start : start + 500])
        if not emails:
            return
        async with self._db.session() as session:
            tenant = await session.get(Tenant, tenant_id)
        if tenant is not None:
            for email in emails:
                await self._throttle.forget(tenant.slug, email)

    async def api_keys(self, principal: Principal, all_users: bool) -> list[ApiKey]:
        async with self._db.session(principal.tenant_id) as session:
            return await repo.api_keys_of(session, None if all_users else principal.user_id)

    # -- users and clients ------------------------------------------------------------------

    async def create_user(
        self,
        *,
        tenant_id: uuid.UUID,
        email: str,
        password: str | None,
        role: UserRole,
        kind: UserKind = UserKind.HUMAN,
        display_name: str = "",
    ) -> User:
        email = email.strip()
        if "@" not in email[1:] or len(email) > 320:
            raise ValidationFailed("not an email address", field="email")
        if password is not None and len(password) < MIN_PASSWORD_LENGTH:
            raise ValidationFailed(
                f"password must have at least {MIN_PASSWORD_LENGTH} characters", field="password"
            )
        password_hash = await hash_password(password) if password else None
        try:
            async with self._db.session(tenant_id) as session:
                user = User(
                    tenant_id=tenant_id,
                    email=email,
                    role=role,
                    kind=kind,
                    display_name=display_name,
                    password_hash=password_hash,
                )
                session.add(user)
                await session.flush()
        except IntegrityError:
            raise Conflict("a user with this email exists", field="email") from None
        return user

    async def list_users(self, principal: Principal) -> list[User]:
        async with self._db.session(principal.tenant_id) as session:
            return await repo.users(session)

    async def invite_user(
        self, principal: Principal, email: str, role: UserRole, display_name: str = ""
    ) -> tuple[User, str]:
        """A new user with a one-time password to hand over (no mail server is assumed)."""
        if role is UserRole.OWNER and principal.role is not UserRole.OWNER:
            raise MissingScope("only an owner can make an owner")
        password = secrets.token_urlsafe(12)
        user = await self.create_user(
            tenant_id=principal.tenant_id,
            email=email,
            password=password,
            role=role,
            display_name=display_name,
        )
        async with self._db.session(principal.tenant_id) as session:
            await record(
                session,
                "user.invited",
                Outcome.SUCCESS,
                tenant_id=principal.tenant_id,
                actor_id=principal.user_id,
                user=str(user.id),
                role=role.value,
            )
        return user, password

    async def set_role(self, principal: Principal, user_id: uuid.UUID, role: UserRole) -> User:
        async with self._db.session(principal.tenant_id) as session:
            user = await repo.user_by_id(session, user_id)
            if user is None:
                raise NotFound("no such user", id=str(user_id))
            touches_owner = UserRole.OWNER in (role, user.role)
            if touches_owner and principal.role is not UserRole.OWNER:
                raise MissingScope("only an owner can grant or remove the owner role")
            if (
                user.role is UserRole.OWNER
                and role is not UserRole.OWNER
                and await repo.owners_count(session) <= 1
            ):
                raise Conflict("a tenant keeps at least one owner")
            previous, user.role = user.role, role
            await record(
                session,
                "user.role_changed",
                Outcome.SUCCESS,
                tenant_id=principal.tenant_id,
                actor_id=principal.user_id,
                user=str(user.id),
                role=role.value,
                previous=previous.value,
            )
        # Tokens carry the role: the user's sessions refresh now. After the commit, so that a
        # token issued after the record has the new role; a retry after an error completes it.
        await self.end_sessions_of(user_id)
        return user

    async def set_active(self, principal: Principal, user_id: uuid.UUID, active: bool) -> User:
        """Disables a user (every credential and open stream of theirs ends at once, on every
        replica; their refresh tokens are revoked) or enables one again."""
        async with self._db.session(principal.tenant_id) as session:
            user = await repo.user_by_id(session, user_id)
            if user is None:
                raise NotFound("no such user", id=str(user_id))
            if not active and user.id == principal.user_id:
                raise Conflict("you cannot disable your own account")
            if not active and user.role is UserRole.OWNER and principal.role is not UserRole.OWNER:
                raise MissingScope("only an owner can disable an owner")
            await self._set_active(session, user, active, principal.user_id)
        if not active:
            # After the commit, so that no token is issued to the user after the record while
            # they still look active; a retry after an error completes it.
            await self.end_sessions_of(user.id)
        return user

    async def set_active_by_email(self, tenant_slug: str, email: str, active: bool) -> User:
        """`set_active` for operators (the CLI): no acting user, so none is audited."""
        target = await self.principal_for(tenant_slug, email)
        async with self._db.session(target.tenant_id) as session:
            user = await repo.user_by_id(session, target.user_id)
            if user is None:  # deleted meanwhile
                raise NotFound(f"no user {email!r} in tenant {tenant_slug!r}")
            await self._set_active(session, user, active, None)
        if not active:
            await self.end_sessions_of(user.id)
        return user

    async def reset_password(self, tenant_slug: str, email: str, password: str) -> User:
        """Sets a user's password (for operators: the CLI) and ends their sessions: refresh
        tokens are revoked, and access tokens and open streams end at once on every replica.
        API keys stay valid (revoke them apart). Failed sign-ins counted against the account
        are forgotten, so that its owner is not locked out of the new password."""
        if len(password) < MIN_PASSWORD_LENGTH:
            raise ValidationFailed(
                f"password must have at least {MIN_PASSWORD_LENGTH} characters", field="password"
            )
        target = await self.principal_for(tenant_slug, email)
        password_hash = await hash_password(password)
        async with self._db.session(target.tenant_id) as session:
            user = await repo.user_by_id(session, target.user_id)
            if user is None:  # deleted meanwhile
                raise NotFound(f"no user {email!r} in tenant {tenant_slug!r}")
            user.password_hash = password_hash
            await repo.revoke_refresh_tokens_of(session, user.id)
            await record(
                session,
                "user.password_reset",
                Outcome.SUCCESS,
                tenant_id=user.tenant_id,
                actor_id=None,
                user=str(user.id),
            )
        # After the commit, as for a disabled user: no token outlives the old password.
        await self.end_sessions_of(user.id)
        await self._throttle.forget(tenant_slug, user.email)
        return user

    @staticmethod
    async def _set_active(
        session: AsyncSession, user: User, active: bool, actor_id: uuid.UUID | None
    ) -> None:
        if (
            not active
            and user.role is UserRole.OWNER
            and user.is_active
            and await repo.owners_count(session) <= 1
        ):
            raise Conflict("a tenant keeps at least one owner")
        changed = user.is_active != active
        user.is_active = active
        if not active:
            await repo.revoke_refresh_tokens_of(session, user.id)
        if changed:
            await record(
                session,
                "user.enabled" if active else "user.disabled",
                Outcome.SUCCESS,
                tenant_id=user.tenant_id,
                actor_id=actor_id,
                user=str(user.id),
            )

    async def end_sessions_of(self, user_id: uuid.UUID) -> None:
        """Refuses every access token and cached API key the user holds now, and ends their
        open streams on every replica. Call it after committing a change that removes or
        disables a user (erasure deletes the user's rows; this ends what they hold)."""
        await self.revocations.revoke(Record.USER, user_id)

    async def audit_events(
        self, principal: Principal, first: int, event: str | None, before_id: int | None
    ) -> list[AuditEvent]:
        if not 1 <= first <= 500:
            raise ValidationFailed("first must be 1 to 500", field="first")
        async with self._db.session(principal.tenant_id) as session:
            return await repo.audit_events(session, first, event, before_id)

    async def record_denial(self, principal: Principal | None, what: str, ip: str | None) -> None:
        async with self._db.session(principal.tenant_id if principal else None) as session:
            await record(
                session,
                "permission.denied",
                Outcome.DENIED,
                tenant_id=principal.tenant_id if principal else None,
                actor_id=principal.user_id if principal else None,
                ip=ip,
                what=what,
            )

    async def tenant_by_slug(self, slug: str) -> Tenant | None:
        async with self._db.session() as session:
            return await repo.tenant_by_slug(session, slug)

    async def is_platform_operator(self, principal: Principal, operator_tenant: str | None) -> bool:
        """Whether `principal` runs the platform: an owner, with the admin scope, of the tenant
        whose slug is `operator_tenant` (SIGHTLINE_PRIVACY_OPERATOR_TENANT; unset: no one)."""
        if not operator_tenant or principal.role is not UserRole.OWNER:
            return False
        if not principal.has(Scope.ADMIN):
            return False
        operators = await self.tenant_by_slug(operator_tenant)
        return operators is not None and operators.id == principal.tenant_id

    async def principal_for(self, tenant_slug: str, email: str) -> Principal:
        """The principal of a user, for administration from the CLI."""
        async with self._db.session() as session:
            tenant = await repo.tenant_by_slug(session, tenant_slug)
        if tenant is None:
            raise NotFound(f"no tenant {tenant_slug!r}")
        async with self._db.session(tenant.id) as session:
            user = await repo.user_by_email(session, email)
        if user is None:
            raise NotFound(f"no user {email!r} in tenant {tenant_slug!r}")
        return Principal(
            user_id=user.id,
            tenant_id=tenant.id,
            role=user.role,
            scopes=grant(user.role, None),
            credential=CredentialKind.ACCESS_TOKEN,
            plan=tenant.plan,
        )

    async def rotate_signing_key(self) -> str:
        async with self._db.session() as session:
            row = await self.signer.rotate(session)
            await record(session, "signing_key.rotated", Outcome.SUCCESS, kid=row.kid)
        async with self._db.session() as session:
            await self.signer.load(session)
        return row.kid

    async def create_client(
        self, tenant_id: uuid.UUID, user_id: uuid.UUID, scopes: list[str]
    ) -> tuple[OAuthClient, str]:
        client_id, secret = new_client()
        async with self._db.session(tenant_id) as session:
            client = OAuthClient(
                tenant_id=tenant_id,
                user_id=user_id,
                client_id=client_id,
                secret_hash=digest(secret),
                scopes=sorted(parse_scopes(scopes)),
            )
            session.add(client)
            await session.flush()
        return client, secret

    async def ensure_tenant(self, slug: str, name: str, plan: str = "free") -> Tenant:
        async with self._db.session() as session:
            tenant = await repo.tenant_by_slug(session, slug)
            if tenant is None:
                tenant = Tenant(slug=slug, name=name, plan=plan)
                session.add(tenant)
                await session.flush()
        return tenant

    async def bootstrap_admin(self) -> str | None:
        """The first tenant and admin, on a database with no tenant. Returns a generated
        password to show once (None when the settings supplied one or nothing was made)."""
        async with self._db.session() as session:
            if await repo.tenant_by_slug(session, self._settings.bootstrap_tenant) is not None:
                return None
        tenant = await self.ensure_tenant(self._settings.bootstrap_tenant, "Default")
        configured = self._settings.bootstrap_admin_password
        password = configured.get_secret_value() if configured else secrets.token_urlsafe(12)
        await self.create_user(
            tenant_id=tenant.id,
            email=self._settings.bootstrap_admin_email,
            password=password,
            role=UserRole.OWNER,
            display_name="Administrator",
        )
        return None if configured else password

    # -- helpers ----------------------------------------------------------------------------

    def _scopes_for(self, role: UserRole, scope: str | None) -> frozenset[Scope]:
        return self._narrow(grant(role, None), scope)

    @staticmethod
    def _narrow(allowed: frozenset[Scope], scope: str | None) -> frozenset[Scope]:
        if scope is None or not scope.strip():
            return allowed
        requested = scope.split()
        if any(name not in Scope._value2member_map_ for name in requested):
            raise InvalidScope("unknown scope requested")
        narrowed = allowed & parse_scopes(requested)
        if not narrowed:
            raise InvalidScope("none of the requested scopes is allowed")
        return narrowed

    async def _new_refresh(
        self, session: AsyncSession, user: User, scopes: frozenset[Scope], family_id: uuid.UUID
    ) -> str:
        token = new_refresh_token()
        row = RefreshToken(
            tenant_id=user.tenant_id,
            user_id=user.id,
            family_id=family_id,
            token_hash=digest(token),
            scopes=sorted(scopes),
            expires_at=datetime.now(UTC) + timedelta(seconds=self._settings.refresh_token_ttl_s),
        )
        session.add(row)
        await session.flush()
        return token

    def _tokens(
        self,
        user: User,
        scopes: frozenset[Scope],
        refresh: str | None,
        plan: str,
        session_id: uuid.UUID | None = None,
    ) -> TokenResponse:
        access, ttl = self.signer.issue(
            user_id=user.id,
            tenant_id=user.tenant_id,
            role=user.role.value,
            scopes=sorted(scopes),
            plan=plan,
            session_id=session_id,
        )
        return TokenResponse(
            access_token=access,
            expires_in=ttl,
            scope=" ".join(sorted(scopes)),
            refresh_token=refresh,
        )

    async def _throttle_login(self, tenant_slug: str, email: str, ip: str | None) -> None:
        """Counts the attempt first (a Redis round trip): parallel guesses are counted before
        any of them reaches the database or the password check."""
        refusal = await self._throttle.attempt(tenant_slug, email, ip)
        if refusal is None:
            return
        async with self._db.session() as session:
            tenant = await repo.tenant_by_slug(session, tenant_slug)
        tenant_id = tenant.id if tenant is not None else None
        async with self._db.session(tenant_id) as session:
            await record(
                session,
                "login.throttled",
                Outcome.DENIED,
                tenant_id=tenant_id,
                ip=ip,
                email=email,
                limit=refusal.limit.value,
            )
        raise RateLimited(
            "too many failed sign-ins; try again later", retry_after_s=refusal.retry_after_s
        )


def require_request_field(value: str | None, name: str) -> str:
    if not value:
        raise InvalidRequest(f"missing {name}")
    return value


def _principal_to_json(principal: Principal) -> str:
    return json.dumps(
        {
            "user_id": str(principal.user_id),
            "tenant_id": str(principal.tenant_id),
            "role": principal.role.value,
            "scopes": sorted(principal.scopes),
            "credential": principal.credential.value,
            "expires_at": principal.expires_at,
            "api_key_id": str(principal.api_key_id) if principal.api_key_id else None,
            "plan": principal.plan,
            "issued_at": principal.issued_at,
        }
    )


def _principal_from_json(raw: bytes) -> Principal:
    data = json.loads(raw)
    return Principal(
        user_id=uuid.UUID(data["user_id"]),
        tenant_id=uuid.UUID(data["tenant_id"]),
        role=UserRole(data["role"]),
        scopes=parse_scopes(data["scopes"]),
        credential=CredentialKind(data["credential"]),
        expires_at=data["expires_at"],
        api_key_id=uuid.UUID(data["api_key_id"]) if data["api_key_id"] else None,
        plan=data["plan"],
        issued_at=data.get("issued_at"),
    )
