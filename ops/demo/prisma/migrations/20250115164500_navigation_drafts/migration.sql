-- CreateEnum
CREATE TYPE "DraftStatus" AS ENUM ('DRAFT', 'PUBLISHED', 'DISCARDED');

-- CreateTable
CREATE TABLE "NavigationDraft" (
    "id" TEXT NOT NULL,
    "brandId" INTEGER NOT NULL,
    "title" TEXT NOT NULL,
    "items" JSONB NOT NULL DEFAULT '[]',
    "status" "DraftStatus" NOT NULL DEFAULT 'DRAFT',
    "version" INTEGER NOT NULL DEFAULT 1,
    "publishedAt" TIMESTAMP(3),
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "NavigationDraft_pkey" PRIMARY KEY ("id")
);

-- CreateIndex
CREATE INDEX "NavigationDraft_brandId_status_idx" ON "NavigationDraft"("brandId", "status");

-- CreateIndex
CREATE UNIQUE INDEX "NavigationDraft_brandId_title_version_key" ON "NavigationDraft"("brandId", "title", "version");

-- AddForeignKey
ALTER TABLE "NavigationDraft" ADD CONSTRAINT "NavigationDraft_brandId_fkey" FOREIGN KEY ("brandId") REFERENCES "Brand"("id") ON DELETE CASCADE ON UPDATE CASCADE;
