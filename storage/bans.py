"""Bans: finding the users behind an account an admin names, and banning or unbanning them."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Identity, User


async def identities_named(
    session: AsyncSession, *, platform: str, workspace_id: str | None, platform_user_id: str
) -> list[Identity]:
    """The identities of a platform account id; `workspace_id=None` finds it in every workspace."""
    query = select(Identity).where(Identity.platform == platform, Identity.platform_user_id == platform_user_id)
    if workspace_id is not None:
        query = query.where(Identity.workspace_id == workspace_id)
    return list((await session.scalars(query.order_by(Identity.id))).all())


async def set_banned(session: AsyncSession, *, user_id: int, banned: bool) -> None:
    """Ban or unban one user, with all their linked accounts. The caller commits."""
    await session.execute(update(User).where(User.id == user_id).values(banned=banned))
